"""`write_report`: one self-contained HTML file (inline CSS, JS and data; nothing fetched) for a run folder.

A folder is verified (every file against its recorded size and sha256) and then read a piece at a time
(`report.source`), never loaded whole, so the memory used does not grow with the number of prompts.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sinkscope.errors import SinkscopeError
from sinkscope.report.assets import css, js
from sinkscope.report.data import (
    ReportLimits,
    curve_data,
    grid_data,
    keys_summary,
    map_data,
    overview_data,
    table_data,
    token_data,
)
from sinkscope.report.encode import script_json
from sinkscope.report.palette import palette_json
from sinkscope.report.sections import (
    Rendered,
    RenderFn,
    SectionContent,
    as_content,
    load_section_modules,
    registered_sections,
)
from sinkscope.report.source import FolderTables, RunTables, run_tables
from sinkscope.store import Run

REPORT_FILE = "report.html"
# Nothing may be fetched: the page runs offline and from file://.
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

Extra = Mapping[str, Rendered | RenderFn]


def write_report(run: Run | str | Path, out: str | Path | None = None, extra: Extra | None = None, *,
                 limits: ReportLimits | None = None, title: str | None = None,
                 prompts: Sequence[int] | None = None) -> Path:
    """Write the run's HTML report and return its path.

    run: a Run, or a run folder (then `out` defaults to `<folder>/report.html`); a folder is verified, then read a
        piece at a time
    out: the file to write (a folder gets `report.html` inside it); required for a Run given in memory
    extra: sections for this report only, {title: HTML str | SectionContent | render(run) function}
    limits: caps on the embedded data (ReportLimits); title: the page title
    prompts: the prompt ids given per-prompt views (grid, token view, maps); default: the first ones (the limits)
    """
    folder: Path | None = None
    tables: RunTables
    if isinstance(run, Run):
        tables = run_tables(run)
    else:
        folder = Path(run)
        tables = FolderTables(folder)
    if out is None:
        if folder is None:
            raise SinkscopeError("write_report needs out= (a file or folder) for a run that was not loaded from disk")
        path = folder / REPORT_FILE
    else:
        path = Path(out)
        if path.is_dir() or (not path.suffix and not path.exists()):
            path = path / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_html(tables, extra, limits=limits, title=title, prompts=prompts), encoding="utf-8")
    return path


def build_html(run: Run | RunTables, extra: Extra | None = None, *, limits: ReportLimits | None = None,
               title: str | None = None, prompts: Sequence[int] | None = None) -> str:
    """The report page as a string (see `write_report`)."""
    tables = run_tables(run)
    limits = limits or ReportLimits()
    overview = overview_data(tables)
    keys = keys_summary(tables, limits, prompts)
    grid = grid_data(tables, limits, keys, prompts)
    data: dict[str, Any] = {
        "palette": palette_json(),
        "overview": overview,
        "grid": grid,
        "tokens": token_data(tables, limits, keys, prompts),
        "curves": curve_data(tables),
        "maps": map_data(tables, limits, prompts),
        "tables": table_data(tables, limits),
        "sections": {},
    }
    parts: list[tuple[str, str, str]] = [("overview", "Overview", _overview_html(overview))]
    if grid is not None:
        parts.append(("grid", "Layer × head grid", _grid_html(grid, data["maps"] is not None)))
    if data["tokens"] is not None:
        parts.append(("tokens", "Token view", _tokens_html(data["tokens"])))
    if data["curves"] is not None:
        parts.append(("curves", "Per-layer curves", '<div id="ss-curves" class="ss-charts"></div>'))
    scripts: list[str] = []
    load_section_modules()
    contributed = [(s.name, s.title, s.render) for s in registered_sections()]
    contributed += [(f"extra-{i}", name, value) for i, (name, value) in enumerate((extra or {}).items())]
    section_run: Run | None = None
    for name, section_title, value in contributed:
        if callable(value) and section_run is None:
            section_run = tables.run()
        content = as_content(value(section_run) if callable(value) else value)
        if content is None:
            continue
        parts.append((name, section_title, content.html))
        if content.data is not None:
            data["sections"][name] = content.data
        if content.script:
            scripts.append(_section_script(name, content))
    if data["tables"]:
        parts.append(("tables", "Tables", _tables_html(data["tables"])))
    page_title = title or _default_title(overview)
    return _page(page_title, overview, parts, script_json(data), scripts)


def _default_title(overview: Mapping[str, Any]) -> str:
    model = overview.get("model") or "run"
    return f"sinkscope report: {model}"


def _section_script(name: str, content: SectionContent) -> str:
    body = content.script or ""
    if "</script" in body.lower():
        raise SinkscopeError(f"the script of report section {name!r} may not contain '</script'")
    return (f"<script>(window.SINKSCOPE_SECTIONS = window.SINKSCOPE_SECTIONS || []).push([{script_json(name)}, "
            f"function (el, data, ss) {{\n{body}\n}}]);</script>")


def _page(title: str, overview: Mapping[str, Any], parts: list[tuple[str, str, str]], data: str,
          scripts: list[str]) -> str:
    esc = html.escape
    nav = " ".join(f'<a href="#sec-{esc(name)}">{esc(t)}</a>' for name, t, _ in parts)
    sub = " · ".join(esc(str(x)) for x in (overview.get("model"), overview.get("command"), overview.get("created"))
                     if x)
    sections = "\n".join(f'<section id="sec-{esc(name)}" data-section="{esc(name)}"><h2>{esc(t)}</h2>{body}</section>'
                         for name, t, body in parts)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="sinkscope">
<title>{esc(title)}</title>
<style>{css()}</style>
</head>
<body>
<header><h1>{esc(title)}</h1><p class="ss-sub">{sub}</p><nav>{nav}</nav></header>
<main>
{sections}
</main>
<div id="ss-tip" role="tooltip" hidden></div>
<script type="application/json" id="ss-data">{data}</script>
{"".join(scripts)}
<script>{js()}</script>
</body>
</html>
"""


def _overview_html(o: Mapping[str, Any]) -> str:
    esc = html.escape
    rows = []
    if o.get("model"):
        shape = ""
        if o.get("layers") is not None:
            shape = f" ({o['layers']} layers × {o['heads']} heads"
            shape += f", {o['kv_heads']} KV heads)" if o.get("kv_heads") not in (None, o.get("heads")) else ")"
        rows.append(("model", f"{o['model']}{shape}"))
    for key in ("command", "created"):
        if o.get(key):
            rows.append((key, str(o[key])))
    params = o.get("parameters") or {}
    if params:
        rows.append(("parameters", _readable(params)))
    tables = o.get("tables") or {}
    if tables:
        rows.append(("tables", ", ".join(f"{k} ({v:,} rows)" for k, v in tables.items())))
    versions = o.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)
    return f'<dl class="ss-kv">{items}</dl>'


def _readable(value: Any) -> str:
    """A run's parameters as text a reader scans, not a Python repr: `a=1, b=x`; a nested mapping as `name (k=v, …)`
    listing the entries that are set (None and False left out); a list as `x, y`; floats without trailing zeros."""
    if isinstance(value, Mapping):
        parts = []
        for k, v in value.items():
            if v is None or v is False:
                continue
            if isinstance(v, Mapping):
                inner = _readable(v)
                parts.append(f"{k} ({inner})" if inner else str(k))
            else:
                parts.append(f"{k}={_readable(v)}")
        return ", ".join(parts)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_readable(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _grid_html(grid: Mapping[str, Any], has_maps: bool) -> str:
    click = ("its attention map (prompts with a stored map) or its attention row" if has_maps
             else "its attention row (this run stored no attention maps: sinkscope profile --out keeps them for the "
                  "first 8 prompts of ≤ 64 tokens, --maps N)")
    return (
        f'<p class="ss-help">Sink strength of each of the {grid["L"]} layers × {grid["H"]} heads (rows are layers). '
        f"Hover a cell for its sink tokens and their mass; click it for {click}.</p>{_limited_html(grid)}"
        '<div class="ss-controls"><label>colour <select id="ss-grid-metric"></select></label>'
        '<label>prompt <select id="ss-grid-prompt"></select></label><span id="ss-grid-legend"></span></div>'
        '<p id="ss-grid-scale" class="ss-note"></p><div class="ss-grid-wrap">'
        '<div id="ss-grid" role="grid" aria-label="sink strength per layer and head"></div></div>'
        '<div id="ss-head" class="ss-head-panel" aria-live="polite"></div>'
    )


def _limited_html(view: Mapping[str, Any]) -> str:
    """The statement of which prompts a per-prompt view covers, when it does not cover them all."""
    return f'<p class="ss-note ss-limited">{html.escape(view["limited"])}</p>' if view.get("limited") else ""


def _tokens_html(tokens: Mapping[str, Any]) -> str:
    notes = _limited_html(tokens) + '<p id="ss-tok-notes" class="ss-note"></p>'
    if tokens.get("mode") == "none":
        return notes
    if tokens.get("mode") == "static":
        described = ", ".join(f"{k} {v}" for k, v in (tokens.get("described") or {}).items())
        help_ = (f"Last-token attention before (raw a) and after detect-mask-renormalise (sink-free b), as computed by "
                 f"<code>explain</code> ({html.escape(described)}). Sinks are marked ▼ and underlined.")
        controls = '<label>prompt <select id="ss-tok-prompt"></select></label>'
    else:
        stat = ("last token's attention row" if tokens.get("stat") == "last_row"
                else "column mass α (this run kept no attention rows)")
        help_ = (f"The prompt's tokens shaded by the {stat}, averaged over the chosen layers × heads (raw a), and "
                 "after detect-mask-renormalise (seed 000 Algorithm 1: flag sinks, set them to 0, renormalise; "
                 "sink-free b). "
                 "Detected sinks are marked ▼ and underlined. Layers and heads: <code>all</code>, <code>-1</code>, "
                 "<code>0,2,5</code>, <code>3-6</code>.")
        controls = (
            '<label>prompt <select id="ss-tok-prompt"></select></label>'
            '<label>layers <input type="text" id="ss-tok-layers" value="-1" spellcheck="false"></label>'
            '<label>heads <input type="text" id="ss-tok-heads" value="all" spellcheck="false"></label>'
            '<label>detector <select id="ss-tok-method"></select></label>'
            '<label><span id="ss-tok-param">threshold</span> <input type="number" id="ss-tok-thr" value="2" '
            'step="0.05" min="0"></label>'
        )
        help_ += (" Every detector of <code>sinkscope detectors</code> is offered; column detectors (column_mass, "
                  "sink_rate, act) are applied to the shown values, and sink_rate marks the keys above ε in at least "
                  "half of the chosen heads.")
    return (
        f'<p class="ss-help">{help_}</p><div class="ss-controls" id="ss-tok-controls">{controls}</div>{notes}'
        '<p id="ss-tok-detector" class="ss-note"></p><p id="ss-tok-msg" class="ss-note" aria-live="polite"></p>'
        '<div class="ss-strip-label">raw attention a</div><div id="ss-before" class="ss-strip"></div>'
        '<div class="ss-strip-label">sink-free b (detect-mask-renormalise)</div><div id="ss-after" class="ss-strip">'
        '</div><h3>Top tokens</h3><div id="ss-topk"></div>'
    )


def _tables_html(tables: list[Mapping[str, Any]]) -> str:
    parts = ['<p class="ss-help">Click a column header to sort.</p>']
    for i, t in enumerate(tables):
        parts.append(f'<h3>{html.escape(str(t["name"]))} <span class="ss-note">({t["total"]:,} rows)</span></h3>'
                     f'<div class="ss-table" data-src="run-table-{i}"></div>'
                     f'<script type="application/json" id="run-table-{i}">{script_json(t)}</script>')
    return "".join(parts)
