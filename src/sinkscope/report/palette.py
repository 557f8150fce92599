"""One palette for the HTML report, the figures and the terminal: colour-blind safe and readable in greyscale.

- `VIRIDIS` / `heat(t)`: the heat-map ramp of the page and the figures (grid, attention maps): perceptually uniform,
  lightness rising monotonically (survives greyscale), hue turning so mid-range values stay distinct.
- `CIVIDIS`: 11 anchors of matplotlib's cividis (Nuñez et al. 2018), kept for callers that ask for it.
- `TOKEN_LOW` → `TOKEN_HIGH`: white → dark blue for token shading (as `sinkscope explain` in the terminal): most
  tokens get little attention and stay white, so text stays legible.
- `OKABE_ITO`: the Okabe & Ito (2008) categorical palette for curves, always paired with distinct `MARKERS`
  and `DASHES` so lines stay distinguishable without colour.
- `apply_style()` / `styled`: the one matplotlib style (fonts, colour cycle, viridis images) every figure in
  `report.figures` is drawn and saved in; `plain_log_axis` and `figure_title` for log axes and titles.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

CIVIDIS: list[tuple[int, int, int]] = [
    (0, 34, 78), (8, 51, 112), (53, 69, 108), (79, 87, 108), (102, 105, 112), (125, 124, 120),
    (148, 142, 119), (174, 163, 113), (200, 184, 102), (229, 207, 82), (254, 232, 56),
]
# 11 anchors of matplotlib's viridis (van der Walt & Smith 2015): perceptually uniform, lightness rising
# monotonically, and its hue turns from purple through teal to yellow, so mid-range values stay apart (cividis's
# mid-tones are greys that readers could not tell apart, #19). The heat maps of the page and of the figures use it.
VIRIDIS: list[tuple[int, int, int]] = [
    (68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140), (34, 168, 132),
    (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37),
]
TOKEN_LOW: tuple[int, int, int] = (255, 255, 255)
TOKEN_HIGH: tuple[int, int, int] = (8, 48, 107)
OKABE_ITO: list[str] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
MARKERS: list[str] = ["o", "s", "^", "D", "v", "P", "X", "*"]
DASHES: list[str] = ["", "6 3", "2 2", "8 3 2 3", "1 3", "10 4", "4 2 1 2", "3 5"]  # SVG stroke-dasharray


def lerp_colour(low: tuple[int, int, int], high: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    """Linear blend of two RGB colours, t clipped to [0, 1]."""
    t = min(1.0, max(0.0, t))
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high, strict=True))  # type: ignore[return-value]


def cividis(t: float) -> tuple[int, int, int]:
    """The cividis colour at t ∈ [0, 1] (piecewise-linear between the anchors)."""
    t = min(1.0, max(0.0, t)) * (len(CIVIDIS) - 1)
    i = min(int(t), len(CIVIDIS) - 2)
    return lerp_colour(CIVIDIS[i], CIVIDIS[i + 1], t - i)


def heat(t: float) -> tuple[int, int, int]:
    """The heat-map colour (viridis) at t ∈ [0, 1] (piecewise-linear between the anchors)."""
    t = min(1.0, max(0.0, t)) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    return lerp_colour(VIRIDIS[i], VIRIDIS[i + 1], t - i)


def palette_json() -> dict[str, object]:
    """The palette as the report's JavaScript reads it (`heat`: the heat-map ramp)."""
    return {"heat": VIRIDIS, "token_low": TOKEN_LOW, "token_high": TOKEN_HIGH, "lines": OKABE_ITO,
            "dashes": DASHES}


# ------------------------------------------------------------------------------------------------ matplotlib
# The one figure style: every function in `report.figures` draws and saves inside `apply_style()`, so the PNG/SVG
# export, the figures a command writes into its run folder and the page's inline images look alike.
HEATMAP_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"  # signed differences (ablated − baseline), centred on 0
FIGURE_STYLE: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "normal",
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 4.5,
    "axes.prop_cycle": None,  # set in apply_style: Okabe-Ito colours (cycler needs matplotlib)
    "image.cmap": HEATMAP_CMAP,
    "axes.formatter.use_mathtext": False,
    "svg.fonttype": "none",  # text stays text in SVG
    "pdf.fonttype": 42,  # TrueType in PDF (editable, embeds cleanly)
}


@contextmanager
def apply_style() -> Iterator[None]:
    """The house style as a matplotlib rc context (Agg backend): fonts, Okabe-Ito colour cycle, viridis images.

    Every figure function in `sinkscope.report.figures` draws and saves inside it (directly or through `styled`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from cycler import cycler

    rc = dict(FIGURE_STYLE, **{"axes.prop_cycle": cycler(color=OKABE_ITO)})
    with matplotlib.rc_context(rc):
        yield


def styled(fn: F) -> F:
    """Decorator: run a figure function inside `apply_style()`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with apply_style():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def plain_log_axis(ax: Any, axis: str = "y") -> None:
    """A log scale whose ticks read as plain numbers (0.5, 2, 40), not matplotlib's 2.4×10⁰ minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def plain(value: float, _pos: int) -> str:
        return f"{value:g}"

    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, …: labels within a decade
    target.set_major_formatter(FuncFormatter(plain))
    target.set_minor_formatter(NullFormatter())


def figure_title(*parts: object) -> str:
    """A figure title from its parts joined by ': ' (empty ones dropped), a file path reduced to its name (a Hub id
    such as org/name is kept)."""
    def short(part: object) -> str:
        text = str(part).rstrip("/\\")
        path_like = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
        return os.path.basename(text.replace("\\", "/")) if path_like else text

    return ": ".join(short(p) for p in parts if p not in (None, ""))
