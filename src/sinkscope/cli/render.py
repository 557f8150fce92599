"""Terminal rendering (rich): the per-layer sink table of `profile`, the token strips of `explain`, and
`split_table`, which splits a table too wide for the terminal into parts that fit instead of cutting cells to '…'."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import pandas as pd

    from sinkscope.analyses.explain import Explanation


def layer_table(layers: pd.DataFrame, title: str) -> Table:
    """Per layer: share of heads with a sink, mean α at position 0, and the sink tokens with their mass."""
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("heads with sink", justify="right")
    table.add_column("α at pos 0", justify="right")
    table.add_column("sink tokens (mean α)")
    for row in layers.itertuples():
        table.add_row(str(row.layer), f"{row.head_share:.0%}", f"{row.pos0_alpha:.3f}", row.sink_tokens or "-")
    return table


def split_table(table: Table, width: int, keep: int = 1) -> list[Table]:
    """[table] when its natural width fits `width` columns, else parts that each repeat the first `keep` columns
    (the row labels) and take as many of the other columns, in order, as fit; titles are numbered (1/k) and the
    caption goes under the last part. Cells are never cut: the full precision is in the run folder's Parquet."""
    console = Console(width=100_000)  # measures natural widths (a measurement is capped at the console's width)
    if console.measure(table).maximum <= width or len(table.columns) <= keep + 1:
        return [table]
    columns = list(table.columns)
    head, rest = columns[:keep], columns[keep:]
    cells = {id(c): list(c.cells) for c in columns}

    def part(chosen: list[object]) -> Table:
        out = Table(title=table.title, title_justify=table.title_justify, box=table.box, show_edge=table.show_edge)
        for c in chosen:
            out.add_column(c.header, justify=c.justify, min_width=c.min_width)  # type: ignore[attr-defined]
        for r in range(table.row_count):
            out.add_row(*(cells[id(c)][r] for c in chosen))
        return out

    groups: list[list[object]] = [[]]
    for column in rest:
        trial = [*head, *groups[-1], column]
        if groups[-1] and console.measure(part(trial)).maximum > width:
            groups.append([])
        groups[-1].append(column)
    parts = [part([*head, *g]) for g in groups]
    for i, p in enumerate(parts):
        p.title = f"{table.title or ''} ({i + 1}/{len(parts)})".strip()
    parts[-1].caption, parts[-1].caption_justify = table.caption, table.caption_justify
    return parts


def print_table(console: Console, table: Table, keep: int = 1) -> None:
    """Print `table`, split into parts that fit the console's width when it is too wide (`split_table`)."""
    for part in split_table(table, console.width, keep):
        console.print(part)


def _shade(weight: float, peak: float) -> str:
    """Background colour for a weight: white → dark blue (colour-blind safe, readable in greyscale)."""
    level = 0.0 if peak <= 0 else min(1.0, weight / peak)
    r = int(255 - 247 * level)
    g = int(255 - 207 * level)
    b = int(255 - 148 * level)
    fg = "white" if level > 0.55 else "black"
    return f"{fg} on rgb({r},{g},{b})"


def token_strip(tokens: list[str], weights: list[float], sinks: list[bool] | None = None) -> Text:
    """The tokens shaded by attention; sinks are underlined and marked with ▼."""
    peak = max(weights) if weights else 0.0
    text = Text()
    for i, (tok, w) in enumerate(zip(tokens, weights, strict=True)):
        shown = tok.replace("\n", "⏎") or "∅"
        style = _shade(w, peak)
        if sinks is not None and sinks[i]:
            style += " underline"
            shown = "▼" + shown
        text.append(shown, style=style)
        text.append(" ")
    return text


def print_explanation(console: Console, ex: Explanation, top_k: int = 10) -> None:
    """Seed 000 Figures 1-2 in the terminal: tokens before and after detect-mask-renormalise, then the top-K."""
    sinks = ex.sinks.tolist()
    where = f"layers {ex.layers}, heads {'all' if len(ex.heads) == ex.trace.n_heads else ex.heads}"
    console.print(f"[bold]last-token attention[/] ({where}); method {ex.method} {ex.params}")
    console.print(Text("before: ", style="bold") + token_strip(ex.tokens, ex.before.tolist(), sinks))
    console.print(Text("after:  ", style="bold") + token_strip(ex.tokens, ex.after.tolist()))
    flagged = [f"{ex.tokens[i]!r}@{i} ({float(ex.before[i]):.3f})" for i, s in enumerate(sinks) if s]
    console.print(f"sinks: {', '.join(flagged) if flagged else 'none'}")
    table = Table(title=f"top-{top_k} tokens", title_justify="left")
    for col in ("rank", "before", "a", "after (sink-free)", "b"):
        table.add_column(col, justify="right" if col in ("rank", "a", "b") else "left")
    before, after = ex.top_k(top_k), ex.top_k(top_k, after=True)
    for rank, (x, y) in enumerate(zip(before, after, strict=True), start=1):
        table.add_row(str(rank), f"{x[1]!r}@{x[0]}", f"{x[2]:.3f}", f"{y[1]!r}@{y[0]}", f"{y[2]:.3f}")
    console.print(table)
