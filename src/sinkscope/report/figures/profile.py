"""Publication-quality figures (matplotlib, Agg backend): heatmaps, attention maps, token strips, curves, bars.

Every function takes tidy tables (or arrays), returns a matplotlib Figure drawn in one consistent style, and never
shows it; `save_figure(fig, path, formats)` writes PNG, SVG and/or PDF. Style (`report.palette.apply_style`):
viridis for heatmaps (perceptually uniform, lightness monotone, so it survives greyscale), white → dark blue for
token shading, the Okabe-Ito palette for lines and bars, always paired with distinct markers, dash patterns or
hatches so nothing depends on colour.

`write_figures(run, out_dir)` draws whatever suits a run's tables: heatmaps, per-layer curves, a token strip and
an attention map for a profile run; one trace-curve figure per table with a `step` column; bars for tables with an
accuracy-like column.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.report.palette import (
    DASHES,
    FIGURE_STYLE,
    HEATMAP_CMAP,
    MARKERS,
    OKABE_ITO,
    TOKEN_HIGH,
    TOKEN_LOW,
    apply_style,
    lerp_colour,
    plain_log_axis,
)
from sinkscope.store import Run, load_run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = ("png", "svg", "pdf")
HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "++", "--"]
ID_COLUMNS = {"prompt_id", "layer", "head", "position", "token", "seed", "run", "model", "step", "epoch", "query",
              "key", "example", "example_id", "id", "n", "n_tokens", "n_queries"}
METRIC_NAMES = ("accuracy", "acc", "exact_match", "match", "score", "f1", "correct")

STYLE = FIGURE_STYLE  # the house style (report.palette), under its older name


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


figure_style = apply_style  # every function here draws inside it


def _new(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = _plt().subplots(figsize=size, layout="constrained")
    return fig, ax


def line_style(i: int) -> dict[str, Any]:
    """Colour, marker and dash pattern of the i-th line (distinct in colour and without it)."""
    dash = DASHES[i % len(DASHES)]
    linestyle: Any = "-" if not dash else (0, tuple(float(x) for x in dash.split()))
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)], "linestyle": linestyle}


def save_figure(fig: Figure, path: str | Path, formats: Iterable[str] | None = None, close: bool = True
                ) -> list[Path]:
    """Write `fig` to `path` (its suffix picks the format) or to `path` with each of `formats` as suffix.

    Returns the written paths. PDF and SVG carry no creation date, so reruns give identical files.
    """
    path = Path(path)
    fmts = [f.lower().lstrip(".") for f in formats] if formats is not None else [path.suffix.lstrip(".") or "png"]
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown:
        raise SinkscopeError(f"cannot save a figure as {unknown[0]!r}; use one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in fmts:
        target = path.with_suffix("." + fmt)
        metadata = {"Date": None} if fmt in ("svg", "pdf") else None
        with figure_style(), warnings.catch_warnings():
            # tokens can hold any script; a glyph the fonts lack is drawn as a box, not worth a warning each
            warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
            fig.savefig(target, format=fmt, metadata=metadata)
        written.append(target)
    if close:
        _plt().close(fig)
    return written


# ------------------------------------------------------------------------------------------------ heatmaps


def head_matrix(table: pd.DataFrame, value: str = "sink_mass", prompt_id: int | None = None) -> np.ndarray:
    """[layer, head] matrix of `value`, the mean over prompts (or one prompt).

    `table` is a keys table (value: sink_mass, top_alpha, pos0_alpha, last_row_sink_mass) or any table with layer,
    head and the `value` column (e.g. heads: n_sinks, sink_alpha, top_alpha).
    """
    from sinkscope.report.data import head_metrics

    frame = table
    if prompt_id is not None and "prompt_id" in frame:
        frame = frame[frame["prompt_id"] == prompt_id]
    if value not in frame and {"alpha", "sink", "position"} <= set(frame.columns):
        frame = head_metrics(frame)
    if value not in frame:
        raise SinkscopeError(f"no column {value!r} in the table (columns: {', '.join(map(str, table.columns))})")
    if frame.empty:
        raise SinkscopeError(f"no rows for prompt {prompt_id}")
    mean = frame.groupby(["layer", "head"])[value].mean()
    L, H = int(mean.index.get_level_values(0).max()) + 1, int(mean.index.get_level_values(1).max()) + 1
    out = np.full((L, H), np.nan)
    out[mean.index.get_level_values(0), mean.index.get_level_values(1)] = mean.to_numpy(dtype=float)
    return out


def head_heatmap(data: pd.DataFrame | np.ndarray, value: str = "sink_mass", *, prompt_id: int | None = None,
                 ax: Axes | None = None, title: str | None = None, label: str | None = None,
                 vmin: float | None = 0.0, vmax: float | None = None) -> Figure:
    """Layer × head heatmap (layer 0 at the top) of a keys/heads table's `value`, or of an [L, H] array."""
    matrix = np.asarray(data, dtype=float) if isinstance(data, np.ndarray) else head_matrix(data, value, prompt_id)
    L, H = matrix.shape
    with figure_style():
        fig, ax = _new(ax, (min(9.0, max(3.4, 1.6 + 0.2 * H)), min(9.0, max(2.4, 1.0 + 0.18 * L))))
        image = ax.imshow(matrix, cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        _int_ticks(ax.xaxis, H)
        _int_ticks(ax.yaxis, L)
        bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        bar.set_label(label or SHORT_LABELS.get(value, value))
        ax.set_title(title if title is not None else _which(value, prompt_id))
    return fig


SHORT_LABELS = {"sink_mass": "Σ α over sinks", "top_alpha": "max α", "pos0_alpha": "α at position 0",
                "last_row_sink_mass": "last token's mass on sinks", "sink_alpha": "Σ α over sinks",
                "n_sinks": "sinks"}


def _which(value: str, prompt_id: int | None) -> str:
    where = f"prompt {prompt_id}" if prompt_id is not None else "mean over prompts"
    return f"{SHORT_LABELS.get(value, value)} per layer × head ({where})"


def _int_ticks(axis: Any, n: int, max_ticks: int = 16) -> None:
    step = max(1, int(np.ceil(n / max_ticks)))
    axis.set_ticks(range(0, n, step))


def attention_map(weights: np.ndarray | pd.DataFrame, tokens: Sequence[str] | None = None, *,
                  prompt_id: int | None = None, layer: int | None = None, head: int | None = None,
                  ax: Axes | None = None, title: str | None = None, max_labels: int = 64) -> Figure:
    """A [query, key] attention map (queries down, keys across), from an array or a `maps` table (pick prompt_id,
    layer, head; default the first of each). Token labels on both axes for maps of up to `max_labels` tokens."""
    if isinstance(weights, pd.DataFrame):
        weights, picked = _map_from_table(weights, prompt_id, layer, head)
        prompt_id, layer, head = picked
    matrix = np.asarray(weights, dtype=float)
    n = matrix.shape[0]
    with figure_style():
        side = min(8.0, 2.0 + 0.11 * n)
        fig, ax = _new(ax, (side + 0.8, side))
        image = ax.imshow(matrix, cmap=HEATMAP_CMAP, vmin=0.0, vmax=max(float(np.nanmax(matrix)), 1e-12),
                          interpolation="nearest")
        if tokens is not None and n <= max_labels:
            labels = [_show(t) for t in tokens]
            ax.set_xticks(range(n), labels, rotation=90, fontsize=max(4.0, min(8.0, 320 / n)), family="monospace")
            ax.set_yticks(range(n), labels, fontsize=max(4.0, min(8.0, 320 / n)), family="monospace")
        else:
            _int_ticks(ax.xaxis, n)
            _int_ticks(ax.yaxis, n)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label("attention weight")
        where = ", ".join(f"{k} {v}" for k, v in (("prompt", prompt_id), ("layer", layer), ("head", head))
                          if v is not None)
        ax.set_title(title if title is not None else "attention map" + (f" ({where})" if where else ""))
    return fig


def _map_from_table(maps: pd.DataFrame, prompt_id: int | None, layer: int | None, head: int | None
                    ) -> tuple[np.ndarray, tuple[int, int, int]]:
    picks = []
    frame = maps
    for column, value in (("prompt_id", prompt_id), ("layer", layer), ("head", head)):
        chosen = int(frame[column].min()) if value is None else value
        frame = frame[frame[column] == chosen]
        picks.append(chosen)
    if frame.empty:
        raise SinkscopeError(f"no map for prompt {picks[0]}, layer {picks[1]}, head {picks[2]} in the maps table")
    n = int(max(frame["query"].max(), frame["key"].max())) + 1
    matrix = np.zeros((n, n))
    matrix[frame["query"].to_numpy(), frame["key"].to_numpy()] = frame["weight"].to_numpy()
    return matrix, (picks[0], picks[1], picks[2])


# ------------------------------------------------------------------------------------------------ token strips


def _show(token: str) -> str:
    shown = str(token).replace("\n", "⏎").replace("\t", "⇥")
    return shown if shown.strip() else shown.replace(" ", "␣") or "∅"


def token_strip(tokens: Sequence[str], before: Sequence[float], after: Sequence[float] | None = None,
                sinks: Sequence[bool] | None = None, *, width: int = 72, max_tokens: int = 400,
                title: str | None = None, labels: tuple[str, str] = ("raw attention a", "sink-free b")) -> Figure:
    """Seed 000 Figures 1-2: the tokens as boxes shaded by attention (white → dark blue, scaled to each row's
    maximum), raw `before` and, if given, sink-free `after`; sinks are marked ▼ and underlined.

    Tokens wrap at `width` characters; at most `max_tokens` tokens are drawn (the first ones).
    """
    from matplotlib.patches import Rectangle

    n = min(len(tokens), max_tokens)
    rows = [("" if after is None else labels[0], np.asarray(before, dtype=float)[:n])]
    if after is not None:
        rows.append((labels[1], np.asarray(after, dtype=float)[:n]))
    flags = [bool(s) for s in sinks][:n] if sinks is not None else [False] * n
    shown = [_show(t) for t in tokens[:n]]
    layout = _wrap([len(s) + 1 for s in shown], width)
    lines = max((y for _, y in layout), default=0) + 1
    block = lines + 1.6
    with figure_style():
        fig, ax = _plt().subplots(figsize=(0.105 * width + 0.4, 0.3 * block * len(rows) + 0.35), layout="constrained")
        for r, (label, weights) in enumerate(rows):
            top = r * block
            peak = float(np.nanmax(weights)) if len(weights) else 0.0
            if label:
                ax.text(0, top + 0.1, label, fontsize=8, fontweight="bold", va="top")
            for i, (x, y) in enumerate(layout):
                level = weights[i] / peak if peak > 0 else 0.0
                face = lerp_colour(TOKEN_LOW, TOKEN_HIGH, level)
                colour = tuple(c / 255 for c in face)
                yy = top + 0.8 + y
                ax.add_patch(Rectangle((x, yy), len(shown[i]) + 0.6, 0.82, facecolor=colour, edgecolor="#999999",
                                       linewidth=0.3))
                ink = "white" if 0.2126 * face[0] + 0.7152 * face[1] + 0.0722 * face[2] < 128 else "black"
                ax.text(x + 0.3, yy + 0.43, shown[i], fontsize=7.5, family="monospace", va="center", ha="left",
                        color=ink)
                if flags[i]:
                    ax.plot([x, x + len(shown[i]) + 0.6], [yy + 0.95, yy + 0.95], color="#D55E00", linewidth=1.6,
                            solid_capstyle="butt")
                    ax.text(x + 0.1, yy - 0.02, "▼", fontsize=5, color="black", va="bottom")
        ax.set_xlim(-0.2, width + 1)
        ax.set_ylim(block * len(rows), -0.1)
        ax.axis("off")
        if title:
            ax.set_title(title, loc="left")
        if n < len(tokens):
            ax.text(width, block * len(rows) - 0.2, f"first {n} of {len(tokens)} tokens", ha="right", fontsize=7,
                    style="italic")
    return fig


def _wrap(widths: Sequence[int], width: int) -> list[tuple[int, int]]:
    """(x, line) of boxes of the given character widths, wrapped at `width` characters."""
    out, x, y = [], 0, 0
    for w in widths:
        if x and x + w > width:
            x, y = 0, y + 1
        out.append((x, y))
        x += w
    return out


def explanation_strip(ex: Any, title: str | None = None) -> Figure:
    """`token_strip` of a sinkscope Explanation (`explain`'s result)."""
    title = title or f"last-token attention, layers {ex.layers}, heads {_span(ex.heads)}; {ex.method} {ex.params}"
    return token_strip(ex.tokens, ex.before.tolist(), ex.after.tolist(), ex.sinks.tolist(), title=title)


def _span(items: Sequence[int]) -> str:
    items = list(items)
    if len(items) > 2 and items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))


def run_token_strip(run: Run, prompt_id: int | None = None, layers: int | Sequence[int] | None = None,
                    heads: int | Sequence[int] | None = None, method: str = "zscore", **params: Any) -> Figure:
    """`token_strip` for one prompt of a profile run: its keys table's last-token rows (or α) aggregated over
    `layers` × `heads` (default: last layer, all heads) and sinks removed with `detect_mask_renormalise`."""
    import torch

    from sinkscope.analyses.mitigate import aggregate_rows, detect_mask_renormalise
    from sinkscope.report.data import prompt_tokens

    keys = run.tables.get("keys")
    if keys is None or keys.empty:
        raise SinkscopeError("the run has no keys table (run `sinkscope profile --out DIR`)")
    pid = int(keys["prompt_id"].min()) if prompt_id is None else prompt_id
    stat = "last_row" if "last_row" in keys else "alpha"
    sub = keys[keys["prompt_id"] == pid]
    L, H, n = int(sub["layer"].max()) + 1, int(sub["head"].max()) + 1, int(sub["position"].max()) + 1
    rows = np.zeros((L, H, n))
    rows[sub["layer"], sub["head"], sub["position"]] = sub[stat]
    a = aggregate_rows(torch.tensor(rows), layers, heads)
    result = detect_mask_renormalise(a, method, **params)
    picked = f"layers {layers if layers is not None else L - 1}, heads {heads if heads is not None else 'all'}"
    title = f"prompt {pid}: {'last-token attention' if stat == 'last_row' else 'column mass'}, {picked}; {method}"
    return token_strip(prompt_tokens(sub)[pid], a.tolist(), result.b.tolist(), result.sinks.tolist(), title=title)


# ------------------------------------------------------------------------------------------------ curves


def layer_curves(layers: pd.DataFrame | None = None, columns: Sequence[str] | None = None, *,
                 norms: pd.DataFrame | None = None, title: str | None = None) -> Figure:
    """Per-layer curves: `columns` of a layers table (default head_share and pos0_alpha) and, from a `norms`
    table (layer, position, norm), ‖h‖ at position 0 against the mean at other positions in a second panel."""
    panels = int(layers is not None) + int(norms is not None)
    if not panels:
        raise SinkscopeError("layer_curves needs a layers table, a norms table or both")
    from sinkscope.report.data import LAYER_CURVES

    names = {**LAYER_CURVES, "mean_sinks": "sinks per head"}
    with figure_style():
        fig, axes = _plt().subplots(1, panels, figsize=(4.2 * panels, 3.0), layout="constrained", squeeze=False)
        ax_iter = iter(axes[0])
        if layers is not None:
            ax = next(ax_iter)
            if columns is not None:
                cols = list(columns)
            else:  # profile's columns, or the mechanisms analysis' (sink_share, alpha0)
                cols = [c for c in ("head_share", "sink_share", "pos0_alpha", "alpha0") if c in layers][:2]
            for i, col in enumerate(cols):
                ax.plot(layers["layer"], layers[col], label=names.get(col, col), **line_style(i))
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(_int_locator())
            ax.set_ylabel("share / α")
            ax.set_ylim(bottom=0)
            ax.grid(True, axis="y")
            ax.legend()
            ax.set_title(title or "sinks per layer")
        if norms is not None:
            ax = next(ax_iter)
            x = "depth" if "depth" in norms else "layer"
            first = norms[norms["position"] == 0].groupby(x)["norm"].mean()
            ax.plot(first.index, first.to_numpy(), label="position 0", **line_style(0))
            others = norms[norms["position"] > 0]
            if len(others):
                rest = others.groupby([c for c in ("prompt_id", x) if c in others])["norm"].median().groupby(x).mean()
                ax.plot(rest.index, rest.to_numpy(), label="other positions (median)", **line_style(1))
            ax.set_xlabel(x)
            if x == "layer":
                ax.xaxis.set_major_locator(_int_locator())
            ax.set_ylabel("‖h‖")
            ax.set_ylim(bottom=0)
            ax.grid(True, axis="y")
            ax.legend()
            ax.set_title("hidden-state norm per layer")
    return fig


def _int_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def metric_columns(table: pd.DataFrame, exclude: Iterable[str] = ()) -> list[str]:
    """Numeric (non-bool) columns that are not identifiers (layer, head, step, …) or in `exclude`."""
    skip = ID_COLUMNS | set(exclude)
    return [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])
            and not pd.api.types.is_bool_dtype(table[c])]


def trace_curves(table: pd.DataFrame, x: str = "step", metrics: Sequence[str] | None = None, *, by: str | None = None,
                 band: bool = True, logy: bool | str | Sequence[str] = "auto", max_lines: int = 8,
                 title: str | None = None) -> Figure:
    """Curves of a tidy table over `x` (e.g. an emergence trace: step, layer, head, alpha0, loss, …).

    One panel per metric (default: every numeric column but identifiers). Without `by`, the mean over the other
    rows at each x, with a min-max band where there are several; with `by` (e.g. "layer"), one line per value:
    up to `max_lines` values in the categorical palette with markers, more on the heat ramp with a colour bar.
    `logy`: True, False, a list of metrics, or "auto" (log scale for positive metrics spanning > 100×).
    """
    if x not in table:
        raise SinkscopeError(f"the table has no {x!r} column (columns: {', '.join(map(str, table.columns))})")
    metrics = list(metrics) if metrics is not None else metric_columns(table, exclude=[x, by or ""])
    if not metrics:
        raise SinkscopeError("no numeric metric columns to plot")
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    with figure_style():
        fig, axes = _plt().subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), layout="constrained",
                                    squeeze=False, sharex=True)
        for k, metric in enumerate(metrics):
            ax = axes[k // cols][k % cols]
            _trace_panel(fig, ax, table, x, metric, by, band, max_lines)
            if _use_log(metric, table[metric].to_numpy(dtype=float), logy):
                plain_log_axis(ax, "y")
            ax.set_title(metric)
            ax.grid(True, axis="y")
            if k // cols == rows - 1 or k + cols >= len(metrics):
                ax.set_xlabel(x)
        for k in range(len(metrics), rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        if title:
            fig.suptitle(title)
    return fig


def _use_log(metric: str, values: np.ndarray, logy: bool | str | Sequence[str]) -> bool:
    if isinstance(logy, bool):
        return logy
    if logy == "auto":
        values = values[np.isfinite(values)]  # positive, beyond probabilities, spanning over 100×
        return bool(len(values)) and values.min() > 0 and values.max() > 1 and values.max() / values.min() > 100
    if isinstance(logy, str):
        raise SinkscopeError(f"logy must be True, False, 'auto' or a list of metrics, not {logy!r}")
    return metric in logy


def _trace_panel(fig: Figure, ax: Axes, table: pd.DataFrame, x: str, metric: str, by: str | None, band: bool,
                 max_lines: int) -> None:
    if by is None:
        stats = table.groupby(x)[metric].agg(["mean", "min", "max", "size"])
        ax.plot(stats.index, stats["mean"], **(line_style(0) | {"marker": "o" if len(stats) <= 40 else None}))
        if band and (stats["size"] > 1).any():
            ax.fill_between(stats.index, stats["min"], stats["max"], color=OKABE_ITO[0], alpha=0.18, linewidth=0,
                            label="min-max")
        return
    groups = sorted(table[by].dropna().unique())
    means = table.groupby([by, x])[metric].mean()
    if len(groups) <= max_lines:
        for i, g in enumerate(groups):
            series = means.loc[g]
            ax.plot(series.index, series.to_numpy(), label=f"{by} {g}",
                    **(line_style(i) | {"marker": line_style(i)["marker"] if len(series) <= 40 else None}))
        ax.legend(ncols=2 if len(groups) > 4 else 1)
        return
    import matplotlib as mpl

    cmap = mpl.colormaps[HEATMAP_CMAP]
    norm = mpl.colors.Normalize(vmin=float(min(groups)), vmax=float(max(groups))) if _numeric(groups) else None
    for i, g in enumerate(groups):
        series = means.loc[g]
        t = norm(float(g)) if norm is not None else i / max(1, len(groups) - 1)
        ax.plot(series.index, series.to_numpy(), color=cmap(t), linewidth=1.0)
    scale = mpl.cm.ScalarMappable(norm=norm or mpl.colors.Normalize(0, len(groups) - 1), cmap=cmap)
    fig.colorbar(scale, ax=ax, fraction=0.05, pad=0.02).set_label(by)


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float | np.integer | np.floating) for v in values)


# ------------------------------------------------------------------------------------------------ evaluation


def eval_bars(table: pd.DataFrame, metric: str | None = None, *, by: str | None = None, hue: str | None = None,
              err: str | None = None, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Grouped bars of an accuracy/match table: `metric` (default the first of accuracy, acc, exact_match, match,
    score, f1, correct, else the first numeric column) per `by` category (default the first text column), one bar
    per `hue` value (default the second text column), with error bars.

    Several rows per (by, hue), e.g. one per example with a 0/1 `match`, are averaged and get the standard error
    (binomial for 0/1 values). One row per bar: `err` names a column of error half-widths, or, for proportions,
    an `n` column (examples behind each value) gives the binomial standard error √(p(1 − p)/n).
    """
    metric = metric or next((c for c in METRIC_NAMES if c in table), None) or next(iter(metric_columns(table)), None)
    if metric is None or metric not in table:
        raise SinkscopeError("no metric column to plot; pass metric=")
    text = [c for c in table.columns if c != metric and not pd.api.types.is_numeric_dtype(table[c])
            and not pd.api.types.is_bool_dtype(table[c])]
    by = by or (text[0] if text else None)
    hue = hue or next((c for c in text if c != by), None)
    frame = table.assign(_value=table[metric].astype(float))
    keys = [c for c in (by, hue) if c is not None]
    if keys:
        grouped = frame.groupby(keys, sort=False)["_value"]
        stats = grouped.agg(["mean", "count", "std"]).rename(columns={"count": "size"}).reset_index()
    else:
        stats = pd.DataFrame({"mean": [frame["_value"].mean()], "size": [frame["_value"].count()],
                              "std": [frame["_value"].std()]})
    values = frame["_value"].dropna()
    unit = bool(len(values)) and values.min() >= 0 and values.max() <= 1
    if (stats["size"] <= 1).all() and (err is not None or (unit and "n" in table)):
        column = err or "n"
        given = table.groupby(keys, sort=False)[column].first().to_numpy() if keys else [table[column].iloc[0]]
        given = np.asarray(given, dtype=float)
        # a column of half-widths, or the number of examples n behind each proportion (binomial standard error)
        stats["err"] = given if err is not None else np.sqrt(stats["mean"] * (1 - stats["mean"]) / given)
    else:
        binary = values.isin([0.0, 1.0]).all()
        se = np.sqrt(stats["mean"] * (1 - stats["mean"]) / stats["size"]) if binary else \
            stats["std"] / np.sqrt(stats["size"])
        stats["err"] = se.where(stats["size"] > 1)
    cats = list(dict.fromkeys(stats[by])) if by else [metric]
    hues = list(dict.fromkeys(stats[hue])) if hue else [None]
    width = 0.8 / len(hues)
    with figure_style():
        fig, ax = _new(ax, (max(3.2, 0.9 + 0.55 * len(cats) * max(1, len(hues)) ** 0.7), 3.0))
        for j, h in enumerate(hues):
            sub = stats if h is None else stats[stats[hue] == h]
            pos = {c: i for i, c in enumerate(cats)}
            xs = np.array([pos[c] for c in sub[by]]) if by else np.array([0])
            offset = (j - (len(hues) - 1) / 2) * width
            bars = ax.bar(xs + offset, sub["mean"], width * 0.92, yerr=sub["err"].fillna(0.0).to_numpy(),
                          color=OKABE_ITO[j % len(OKABE_ITO)], edgecolor="black", linewidth=0.6,
                          hatch=HATCHES[j % len(HATCHES)], capsize=2, ecolor="#333333",
                          label=None if h is None else str(h), error_kw={"linewidth": 0.8})
            ax.bar_label(bars, fmt="%.2f", fontsize=6.5, padding=2)
        ax.set_xticks(range(len(cats)), [str(c) for c in cats], rotation=30 if len(cats) > 5 else 0,
                      ha="right" if len(cats) > 5 else "center")
        ax.set_ylabel(metric)
        if unit:
            ax.set_ylim(0, 1.1)
        ax.grid(True, axis="y")
        if hue:
            ax.legend(title=hue, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if by:
            ax.set_xlabel(by)
        ax.set_title(title or f"{metric}" + (f" by {by}" if by else ""))
    return fig


# ------------------------------------------------------------------------------------------------ whole runs


def write_figures(run: Run | str | Path, out_dir: str | Path, formats: Iterable[str] = ("png",),
                  prompt_id: int | None = None) -> list[Path]:
    """Draw every figure that suits the run's tables into `out_dir`; returns the written files.

    keys/heads → `heads_<metric>` heatmaps; layers/norms → `layer_curves`; keys with last-token rows →
    `token_strip` (last layer, all heads, z-score); maps → `attention_map` of the strongest head;
    any table with a `step` column → `trace_<table>`; otherwise each accuracy-like column (accuracy, acc,
    exact_match, match, score, f1, correct) of a table → `eval_<table>_<column>` bars.
    """
    if not isinstance(run, Run):
        run = load_run(run)
    out = Path(out_dir)
    formats = list(formats)
    written: list[Path] = []
    t = run.tables

    def save(fig: Figure, name: str) -> None:
        written.extend(save_figure(fig, out / name, formats))

    keys = t.get("keys")
    if keys is not None and not keys.empty:
        for value in ("sink_mass", "top_alpha"):
            save(head_heatmap(keys, value, prompt_id=prompt_id), f"heads_{value}")
        save(run_token_strip(run, prompt_id), "token_strip")
    if (t.get("layers") is not None and "layer" in t["layers"]) or t.get("norms") is not None:
        layers = t.get("layers") if t.get("layers") is not None and "layer" in t["layers"] else None
        save(layer_curves(layers, norms=t.get("norms")), "layer_curves")
    maps = t.get("maps")
    if maps is not None and not maps.empty:
        pid = int(maps["prompt_id"].min()) if prompt_id is None else prompt_id
        layer, head = _strongest_head(keys, pid) if keys is not None else (None, None)
        tokens = None
        if keys is not None:
            from sinkscope.report.data import prompt_tokens

            tokens = prompt_tokens(keys[keys["prompt_id"] == pid]).get(pid)
        save(attention_map(maps, tokens, prompt_id=pid, layer=layer, head=head), "attention_map")
    for name, frame in t.items():
        if name in ("keys", "heads", "layers", "maps", "norms", "prompts", "skipped") or frame.empty:
            continue
        if "step" in frame and metric_columns(frame, exclude=["step"]):
            by = "layer" if "layer" in frame and frame["layer"].nunique() > 1 else None
            save(trace_curves(frame, "step", by=by, title=name), f"trace_{name}")
        else:
            for metric in [c for c in METRIC_NAMES if c in frame and frame[c].notna().any()]:
                save(eval_bars(frame, metric, title=f"{name}: {metric}"), f"eval_{name}_{metric}")
    return written


def _strongest_head(keys: pd.DataFrame, prompt_id: int) -> tuple[int | None, int | None]:
    sub = keys[keys["prompt_id"] == prompt_id]
    if sub.empty:
        return None, None
    row = sub.loc[sub["alpha"].idxmax()]
    return int(row["layer"]), int(row["head"])
