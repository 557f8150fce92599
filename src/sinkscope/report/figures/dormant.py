"""Figure of a `sinkscope dormant` run: heads × domains (Guo et al. 2024), in the style of `report.palette`.

``head_domains.png``: two heat maps over the same grid (columns: every head, layer by layer, numbered from 0; rows:
the domains) — the sink share σ (the heat ramp), and each head's state (dormant / mixed / active); the heads that are
dormant in one domain and active in another are marked below the grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.palette import HEATMAP_CMAP, OKABE_ITO, figure_title, styled

STATE_CODE = {"active": 0, "mixed": 1, "dormant": 2}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@styled
def plot_head_domains(heads: pd.DataFrame, switch: pd.DataFrame, path: str | Path, model: str = "") -> Path:
    """heads: the head_domains table; switch: the domain_switch table. Writes a PNG and returns its path."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    domains = list(dict.fromkeys(heads["domain"]))
    order = heads[["layer", "head"]].drop_duplicates().sort_values(["layer", "head"])
    keys = list(zip(order["layer"], order["head"], strict=True))
    column = {k: i for i, k in enumerate(keys)}
    share = np.full((len(domains), len(keys)), np.nan)
    state = np.full((len(domains), len(keys)), np.nan)
    for row in heads.itertuples():
        d, c = domains.index(row.domain), column[(row.layer, row.head)]
        share[d, c] = row.sink_share
        state[d, c] = STATE_CODE[row.state]
    width = min(22.0, max(8.0, 0.045 * len(keys) + 3))
    fig, axes = plt.subplots(2, 1, figsize=(width, 1.2 + 0.7 * len(domains)), sharex=True)
    im = axes[0].imshow(share, aspect="auto", cmap=HEATMAP_CMAP, vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=axes[0], label="sink share σ", fraction=0.03, pad=0.01)
    states = ListedColormap([OKABE_ITO[5], "#dddddd", OKABE_ITO[1]])
    im2 = axes[1].imshow(state, aspect="auto", cmap=states, vmin=-0.5, vmax=2.5, interpolation="nearest")
    bar = fig.colorbar(im2, ax=axes[1], ticks=[0, 1, 2], fraction=0.03, pad=0.01)
    bar.ax.set_yticklabels(["active", "mixed", "dormant"])
    layers = order["layer"].to_numpy()
    starts = np.flatnonzero(np.r_[True, layers[1:] != layers[:-1]])
    step = max(1, len(starts) // 16)
    for ax in axes:
        ax.set_yticks(range(len(domains)), domains, fontsize=8)
        for s in starts[1:]:
            ax.axvline(s - 0.5, color="white", lw=0.4)
    for _, row in switch.iterrows():
        axes[1].plot(column[(row["layer"], row["head"])], len(domains) - 0.3, marker="^", color="black", ms=5,
                     clip_on=False)
    axes[1].set_xticks(starts[::step], [str(v) for v in layers[starts][::step]], fontsize=8)
    axes[1].set_xlabel("layer (each column one head, heads 0… within the layer)"
                       + ("; ▲ dormant in one domain, active in another" if len(switch) else ""))
    axes[0].set_title(figure_title(model, "sink share per head and domain"))
    axes[1].set_title("state: dormant (σ ≥ threshold, small output), active (σ below the active share), mixed")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
