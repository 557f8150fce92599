"""Figure of a `sinkscope overmixing` run (Barbero et al. 2025; Queipo-de-Llano et al. 2025), in the style of
`report.palette`.

``overmixing.png``: four panels over the layers (numbered from 0; −1 the embeddings), the sink intact and masked side
by side in each: the perturbation's spread ‖Δh_j‖/‖h_j‖ (mean over later positions, log scale), the representation
entropy, the BOS sink rate and ‖h₀‖ / median ‖h_j‖.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from sinkscope.report.palette import MARKERS, OKABE_ITO, figure_title, plain_log_axis, styled

PANELS = (("spread_mean", "spread ‖Δh_j‖ / ‖h_j‖ (j after i)", True),
          ("entropy", "representation entropy (nats)", False),
          ("sink_rate", "BOS sink rate (share of heads)", False),
          ("bos_ratio", "‖h₀‖ / median ‖h_j‖", True))
STYLE = {"intact": (OKABE_ITO[0], MARKERS[0], "-"), "masked": (OKABE_ITO[1], MARKERS[1], "--")}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@styled
def plot_overmixing(layers: pd.DataFrame, path: str | Path, model: str = "", position: int | None = None) -> Path:
    """layers: the `layers` table of an overmixing run (condition × layer). Writes a PNG and returns its path."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (column, label, log) in zip(axes, PANELS, strict=True):
        for condition, group in layers.groupby("condition", sort=False):
            colour, marker, dash = STYLE.get(str(condition), (OKABE_ITO[2], MARKERS[2], ":"))
            part = group.dropna(subset=[column])
            if log:
                part = part[part[column] > 0]
            ax.plot(part["layer"], part[column], marker=marker, ms=3, ls=dash, color=colour,
                    label=f"sink {condition}")
        if log:
            plain_log_axis(ax, "y")
        ax.set_xlabel("layer (−1: embeddings)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    where = f", token {position} perturbed" if position is not None else ""
    fig.suptitle(figure_title(model, f"over-mixing with the sink intact and masked{where}"))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
