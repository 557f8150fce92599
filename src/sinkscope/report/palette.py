"""One palette for the HTML report, the figures and the terminal: colour-blind safe and readable in greyscale.

- `CIVIDIS`: 11 anchors of matplotlib's cividis (Nuñez et al. 2018), for heatmaps (grid, attention maps): a
  colour-vision-deficiency-optimised ramp whose lightness rises monotonically, so it survives greyscale printing.
- `TOKEN_LOW` → `TOKEN_HIGH`: white → dark blue for token shading (as `sinkscope explain` in the terminal): most
  tokens get little attention and stay white, so text stays legible.
- `OKABE_ITO`: the Okabe & Ito (2008) categorical palette for curves, always paired with distinct `MARKERS`
  and `DASHES` so lines stay distinguishable without colour.
"""

from __future__ import annotations

CIVIDIS: list[tuple[int, int, int]] = [
    (0, 34, 78), (8, 51, 112), (53, 69, 108), (79, 87, 108), (102, 105, 112), (125, 124, 120),
    (148, 142, 119), (174, 163, 113), (200, 184, 102), (229, 207, 82), (254, 232, 56),
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


def palette_json() -> dict[str, object]:
    """The palette as the report's JavaScript reads it."""
    return {"cividis": CIVIDIS, "token_low": TOKEN_LOW, "token_high": TOKEN_HIGH, "lines": OKABE_ITO,
            "dashes": DASHES}
