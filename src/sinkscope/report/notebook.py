"""Notebook display: the `_repr_html_` of a Trace and of the analyses' result objects, as plain HTML (no script, every
text escaped), in the report's palette: a layer × head grid on the heat ramp with its scale stated, a summary, and
the first rows of each table (the full tables stay in the object and in the run folder)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.palette import heat

MAX_ROWS = 8


def heat_grid_html(matrix: np.ndarray, caption: str, note: str = "") -> str:
    """A layer × head table (matrix [L, H], NaN = no value), each cell coloured on the heat ramp from 0 to the grid's
    largest value; the caption names the value and states that range, `note` what it means."""
    matrix = np.asarray(matrix, dtype=float)
    finite = matrix[np.isfinite(matrix)]
    hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0

    def cell(layer: int, head: int, v: float) -> str:
        if not np.isfinite(v):
            return f"<td title='layer {layer}, head {head}: no value' style='background:#eee'></td>"
        r, g, b = heat(v / hi)
        ink = "#000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 128 else "#fff"
        return (f"<td title='layer {layer}, head {head}: {v:.4f}' style='background:rgb({r},{g},{b});color:{ink};"
                f"padding:1px 4px;font-size:80%;text-align:right'>{v:.2f}</td>")

    head_row = "".join(f"<th style='padding:1px 4px'>{h}</th>" for h in range(matrix.shape[1]))
    rows = "".join(f"<tr><th style='padding:1px 4px'>{layer}</th>"
                   + "".join(cell(layer, h, float(v)) for h, v in enumerate(values)) + "</tr>"
                   for layer, values in enumerate(matrix))
    scale = f"colour: 0 (dark purple) to {hi:.4f} (yellow), the largest value here"
    text = html.escape(f"{caption}; {scale}" + (f". {note}" if note else ""))
    return (f"<table style='border-collapse:collapse'><caption style='caption-side:top;text-align:left'>{text}"
            f"</caption><thead><tr><th>L \\ H</th>{head_row}</tr></thead><tbody>{rows}</tbody></table>")


def tables_html(tables: Mapping[str, pd.DataFrame], max_rows: int = MAX_ROWS) -> str:
    """Each table's first `max_rows` rows, under its name and row count (escaped)."""
    parts = []
    for name, frame in tables.items():
        if not isinstance(frame, pd.DataFrame):
            continue
        shown = frame.head(max_rows).to_html(index=False, escape=True, float_format=lambda x: f"{x:.4g}",
                                             border=0)
        more = f", first {max_rows} shown" if len(frame) > max_rows else ""
        parts.append(f"<details{' open' if not parts else ''}><summary><b>{html.escape(str(name))}</b> "
                     f"({len(frame):,} rows{more})</summary>{shown}</details>")
    return "".join(parts)


def summary_html(summary: Mapping[str, Any]) -> str:
    """A mapping as name: value lines (nested mappings and long values shortened)."""
    items = []
    for key, value in summary.items():
        text = str(value) if not isinstance(value, float) else f"{value:.4g}"
        text = text if len(text) <= 160 else text[:157] + "..."
        items.append(f"<li><b>{html.escape(str(key))}</b>: {html.escape(text)}</li>")
    return f"<ul style='margin:4px 0'>{''.join(items)}</ul>" if items else ""


def head_grid(table: pd.DataFrame, value: str) -> np.ndarray | None:
    """[L, H] mean of `value` per (layer, head) of a long table, or None when the table lacks the columns."""
    if not {"layer", "head", value} <= set(table.columns) or table.empty:
        return None
    mean = table.groupby(["layer", "head"])[value].mean()
    layers, heads = mean.index.get_level_values(0), mean.index.get_level_values(1)
    out = np.full((int(layers.max()) + 1, int(heads.max()) + 1), np.nan)
    out[layers, heads] = mean.to_numpy(dtype=float)
    return out


def result_html(result: Any, title: str | None = None) -> str:
    """A result object's notebook view: its title, its summary or parameters, and its tables' first rows."""
    name = title or type(result).__name__
    info = getattr(result, "info", None) or {}
    model = info.get("model") if isinstance(info, Mapping) else None
    head = html.escape(f"{name}" + (f": {model}" if model else ""))
    summary = getattr(result, "summary", None)
    params = getattr(result, "params", None)
    shown = summary if isinstance(summary, Mapping) else params if isinstance(params, Mapping) else {}
    tables = getattr(result, "tables", None) or {}
    return f"<div><p><b>{head}</b></p>{summary_html(shown)}{tables_html(tables)}</div>"


def trace_html(trace: Any) -> str:
    """A Trace: the model, its prompts and shape, what was captured, the first prompt's tokens, and a layer × head grid
    of α at position 0 (mean over prompts)."""
    P, L, H, N = trace.key_mass.shape
    captured = [name for name in ("rows", "entropy", "maps", "head_outputs", "values", "columns", "hidden",
                                  "hidden_norms", "logprobs") if getattr(trace, name, None) is not None]
    model = trace.info.get("model", "")
    head = html.escape(f"Trace{': ' + str(model) if model else ''}: {P} prompt(s), {L} layers × {H} heads, up to "
                       f"{N} tokens; captured key mass α" + (", " + ", ".join(captured) if captured else ""))
    tokens = " ".join(repr(t) for t in trace.tokens[0][:64]) if trace.tokens else ""
    more = f" (+{len(trace.tokens[0]) - 64} more)" if trace.tokens and len(trace.tokens[0]) > 64 else ""
    grid = trace.key_mass[:, :, :, 0].float().mean(0).numpy()  # [L, H]
    return (f"<div><p><b>{head}</b></p><p style='font-family:monospace;font-size:85%'>prompt 0: "
            f"{html.escape(tokens + more)}</p>"
            + heat_grid_html(grid, "α at position 0 per layer × head (mean over prompts)",
                             "α_0 is the attention position 0 receives averaged over the queries, in [0, 1]")
            + "</div>")
