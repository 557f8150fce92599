"""Figures of the catch-tag-release analysis (`sinkscope.analyses.tags`): the PCA view, the threshold sensitivity
curve and the histogram of tag cosines (matplotlib, Agg, in `report.palette`'s style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.report.palette import MARKERS, OKABE_ITO, styled


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SinkscopeError("figures need matplotlib: pip install matplotlib, or pass --no-figures") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@styled
def plot_pca(view: pd.DataFrame, path: str | Path) -> Path:
    """Two panels: head outputs (pc1, pc2) and residual stream (res_pc1, res_pc2), coloured by dominant sink."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    groups = list(view.groupby("sink_position"))
    for ax, (x, y), title in zip(axes, [("pc1", "pc2"), ("res_pc1", "res_pc2")],
                                 [f"head output L{view['layer'].iloc[0]} H{view['head'].iloc[0]}",
                                  f"residual stream entering layer {view['residual_layer'].iloc[0]}"], strict=True):
        for i, (pos, part) in enumerate(groups):
            label = "no sink" if pos < 0 else f"{part['sink_token'].iloc[0]!r}@{pos}"
            ax.scatter(part[x], part[y], s=18, color=OKABE_ITO[i % len(OKABE_ITO)], marker=MARKERS[i % len(MARKERS)],
                       label=label)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    axes[0].legend(title="strongest sink")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


@styled
def plot_sensitivity(tables: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Seed 003 rebuttal: one point per ε, x = mean number of sinks, y = mean variance explained; one curve per
    model (dict key)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, table) in enumerate(tables.items()):
        ax.plot(table["mean_sinks"], table["mean_var_explained"], marker=MARKERS[i % len(MARKERS)], label=name)
        for _, row in table.iterrows():
            ax.annotate(f"{row['eps']:g}", (row["mean_sinks"], row["mean_var_explained"]), fontsize=7)
    ax.set_xlabel("mean number of sinks per head")
    ax.set_ylabel("mean variance explained by tags")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


@styled
def plot_cosine_histogram(hist: pd.DataFrame, path: str | Path) -> Path:
    """Bar chart of the tag-cosine histogram (same head and across heads)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, kind in enumerate(("same_head", "cross_head")):
        part = hist[hist["kind"] == kind]
        xs = np.arange(len(part)) + (i - 0.5) * 0.4
        ax.bar(xs, part["count"], width=0.4, label=kind, hatch=["", "//"][i], edgecolor="white")
    part = hist[hist["kind"] == "all"]
    ax.set_xticks(np.arange(len(part)), [f"[{lo:g},{hi:g})" for lo, hi in zip(part["lo"], part["hi"], strict=True)],
                  rotation=45)
    ax.set_ylabel("pairs of tags")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
