"""The registration API through which analyses add sections to the HTML report.

An analysis registers a render function once (at import time); `write_report` calls it with the run and places
what it returns in the page::

    from sinkscope.report import SectionContent, register_section, table_html

    @register_section("eval", title="Evaluation", order=10)
    def eval_section(run):
        if "accuracy" not in run.tables:
            return None                                  # nothing to show for this run: the section is omitted
        return SectionContent(html="<p>Accuracy per task.</p>" + table_html(run["accuracy"], "eval-accuracy"))

For a report of a run folder, `run.tables` reads each table whole when the function first asks for it (the built-in
sections read folders a piece at a time; a section over a table that grows with the prompts should bound what it
reads). A render function returns an HTML fragment (a str), a `SectionContent` (HTML plus optional JSON data and a small
script), or None. Its HTML is inserted as is: escape any text that comes from data (`html.escape`), or let
`table_html` render tables. The optional `script` is the body of a JavaScript function `(el, data, ss)` run after
the page loads: `el` is the section element, `data` the section's data, `ss` the page's `SINKSCOPE` helpers
(`ss.tip(el, text)`, `ss.lineChart(el, series, opts)`, `ss.table(el, tableJson)`, `ss.colour(t)`).
"""

from __future__ import annotations

import html
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.report.encode import script_json, table_json
from sinkscope.store import Run


@dataclass(frozen=True)
class SectionContent:
    """What a section contributes: an HTML fragment, optional JSON-serialisable data and an optional script body."""

    html: str
    data: Any = None
    script: str | None = None


Rendered = str | SectionContent | None
RenderFn = Callable[[Run], Rendered]


@dataclass(frozen=True)
class Section:
    """A registered section: `name` (unique id), `title`, `render(run)`, and `order` (smaller comes first)."""

    name: str
    title: str
    render: RenderFn
    order: int = 100


SECTIONS: dict[str, Section] = {}
RESERVED = frozenset({"overview", "grid", "tokens", "curves", "tables"})  # the built-in sections' names
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

# Modules that register sections when imported; `write_report` imports them first (skipping any that is not
# installed), so `sinkscope report RUN_DIR` shows their sections without the analysis having run in this process.
SECTION_MODULES: list[str] = [
    "sinkscope.report.views.eval",
    "sinkscope.report.views.stream",
    "sinkscope.report.views.kvquant",
    "sinkscope.report.views.tags",
    "sinkscope.report.views.mechanisms",
    "sinkscope.report.views.calibrate",
    "sinkscope.report.views.mitigation",
    "sinkscope.report.views.vision",
    "sinkscope.report.views.dormant",
    "sinkscope.report.views.overmixing",
    "sinkscope.report.views.generate",
]


def load_section_modules() -> None:
    """Import every module in SECTION_MODULES (a missing one is skipped; other import errors propagate)."""
    for name in SECTION_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not name.startswith(err.name):
                raise


def register_section(name: str, render: RenderFn | None = None, *, title: str | None = None, order: int = 100,
                     replace: bool = False) -> Any:
    """Register `render(run) -> str | SectionContent | None` as report section `name`.

    Use directly (`register_section("tags", fn)`) or as a decorator (`@register_section("tags")`). `title` defaults
    to the name; sections are placed by `order`, then name, after the built-in ones and before the run's tables.
    Registering a taken name raises unless `replace=True`. Returns the function (so decorators keep it).
    """
    if not _NAME.match(name):
        raise SinkscopeError(f"section name {name!r} must start with a letter and hold only letters, digits, _ or -")
    if name in RESERVED or name.startswith("extra-"):
        raise SinkscopeError(f"section name {name!r} is taken by the report itself; pick another")

    def add(fn: RenderFn) -> RenderFn:
        if name in SECTIONS and not replace and SECTIONS[name].render is not fn:
            raise SinkscopeError(f"report section {name!r} is already registered; pass replace=True to override it")
        SECTIONS[name] = Section(name=name, title=title or name, render=fn, order=order)
        return fn

    return add(render) if render is not None else add


def unregister_section(name: str) -> None:
    """Remove a registered section (no error if absent)."""
    SECTIONS.pop(name, None)


def registered_sections() -> list[Section]:
    """The registered sections in page order."""
    return sorted(SECTIONS.values(), key=lambda s: (s.order, s.name))


def as_content(rendered: Rendered) -> SectionContent | None:
    """Normalise what a render function returned."""
    if rendered is None or isinstance(rendered, SectionContent):
        return rendered
    if isinstance(rendered, str):
        return SectionContent(html=rendered)
    raise SinkscopeError(f"a report section must return str, SectionContent or None, not {type(rendered).__name__}")


def table_html(frame: pd.DataFrame, table_id: str, caption: str | None = None, max_rows: int = 500,
               sort_by: str | None = None) -> str:
    """A sortable table for a section's HTML: a placeholder the page fills, plus the table's rows as JSON.

    `table_id` must be unique in the page. At most `max_rows` rows are embedded (the top ones by `sort_by` if given).
    """
    if not _NAME.match(table_id):
        raise SinkscopeError(f"table id {table_id!r} must start with a letter and hold only letters, digits, _ or -")
    head = f"<h3>{html.escape(caption)}</h3>" if caption else ""
    payload = script_json(table_json(frame, max_rows=max_rows, sort_by=sort_by))
    return (f'{head}<div class="ss-table" data-src="tbl-{table_id}"></div>'
            f'<script type="application/json" id="tbl-{table_id}">{payload}</script>')
