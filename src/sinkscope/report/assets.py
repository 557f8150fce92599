"""The report page's inline stylesheet and script (vanilla, no dependencies, nothing fetched), kept as package data
in `sinkscope/report/html/` (report.css, report.js) and read once.

The script reads the JSON in <script id="ss-data">, draws the layer × head grid (DOM cells, one delegated
listener), the token view (client-side aggregation over layers × heads and detect-mask-renormalise, seed 000
Algorithm 1), the per-layer curves (SVG), attention maps on demand (canvas) and sortable tables. Helpers are
exposed as `window.SINKSCOPE` for contributed sections and for tests.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def asset(name: str) -> str:
    """The text of `sinkscope/report/html/<name>` (report.css or report.js)."""
    return resources.files("sinkscope.report").joinpath("html", name).read_text(encoding="utf-8")


def css() -> str:
    return asset("report.css")


def js() -> str:
    return asset("report.js")
