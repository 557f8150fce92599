"""Report sections for the run folders of the commands that write one (eval, stream, tags, mechanisms, calibrate,
bench-mitigation): one module per command, registered through `report.sections.SECTION_MODULES`.

Each module reads the run's tables through `report.source` (a folder a piece at a time), bounds what it embeds, and
draws with the page's helpers (`ss.lineChart`, `ss.barChart`, `ss.scatter`, `ss.heatMap`, `ss.tokenStrip`,
`ss.table`); its script is `html/view-<name>.js`. The figures a command wrote into its folder are embedded inline.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.assets import asset
from sinkscope.report.encode import round_floats, table_json
from sinkscope.report.source import RunTables, run_tables
from sinkscope.store import Run

MAX_ROWS = 500  # rows of a table embedded for a sortable grid


def tables_of(run: Run) -> RunTables:
    """The run's tables as the report reads them (a folder: a piece at a time)."""
    return run_tables(run)


def script(name: str) -> str:
    """The body of the section script `html/view-<name>.js`."""
    return asset(f"view-{name}.js")


def floats(values: Any, digits: int = 5) -> list[Any]:
    """A float column as a JSON list (NaN → None)."""
    return round_floats(np.asarray(values, dtype=np.float64), digits)


def grid(frame: pd.DataFrame, sort_by: str | None = None) -> dict[str, Any]:
    """A table for `ss.table` (at most MAX_ROWS rows)."""
    return table_json(frame, MAX_ROWS, sort_by)


def figures_html(tables: RunTables, captions: Sequence[tuple[str, str]]) -> str:
    """The PNG figures the run lists, inline (data URIs), each with its caption; "" when the run has none."""
    parts = []
    for name, caption in captions:
        data = tables.file(name)
        if not data:
            continue
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img src="{uri}" alt="{html.escape(caption)}" data-file="{html.escape(name)}">'
                     f"<figcaption>{html.escape(name)}: {html.escape(caption)}</figcaption></figure>")
    return f'<h3>Figures</h3><div class="ss-figures">{"".join(parts)}</div>' if parts else ""


def help_text(text: str) -> str:
    return f'<p class="ss-help">{text}</p>'
