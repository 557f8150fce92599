"""Figures of a mechanisms run (matplotlib, Agg backend, in `report.palette`'s style), written as PNG files into the
run folder.

- ``norm_heatmap.png``: log₁₀ ‖h‖ per site (depth) × position for the first prompt (seed 001 Figs. 2-3);
- ``pos0_norm.png``: ‖h₀‖ and the median ‖h_j‖ (j ≥ 1) per depth, with the per-layer sink share;
- ``bos_removal.png``: sink share and position-0 norm ratio per layer, with BOS / without / replaced;
- ``similarity.png``: cross-input cosine per depth × position (seed 001 Fig. 4);
- ``ablation.png``: change in α₀ per later layer and in the position-0 norm ratio per block, one row per ablation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sinkscope.report.palette import DIVERGING_CMAP, OKABE_ITO, figure_title, plain_log_axis, styled

if TYPE_CHECKING:
    from sinkscope.analyses.mechanisms.analysis import MechanismsResult


def _plt() -> Any:
    import matplotlib.pyplot as plt

    return plt


def _depth_ticks(ax: Any, depths: np.ndarray, axis: str = "y", every: int = 0) -> None:
    step = every or max(1, len(depths) // 16)
    idx = np.arange(0, len(depths), step)
    labels = [f"{d:g}" for d in depths[idx]]
    if axis == "y":
        ax.set_yticks(idx, labels)
    else:
        ax.set_xticks(idx, labels)


@styled
def norm_heatmap(result: MechanismsResult, path: Path) -> None:
    plt = _plt()
    norms = result.tables["norms"]
    pid = int(result.tables["prompts"]["prompt_id"].iloc[0])
    one = norms[norms["prompt_id"] == pid]
    grid = one.pivot_table(index="depth", columns="position", values="norm").sort_index()
    tokens = one.drop_duplicates("position").sort_values("position")["token"].tolist()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * grid.shape[1] + 2), max(4, 0.12 * grid.shape[0] + 1.5)))
    im = ax.imshow(np.log10(grid.to_numpy().clip(min=1e-6)), aspect="auto", origin="lower")
    _depth_ticks(ax, grid.index.to_numpy())
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90)
    ax.set_ylabel("depth (x.5: after attention + residual, x: after block)")
    ax.set_title(figure_title(result.summary["model"], f"log10 ‖h‖ per position (prompt {pid})"))
    fig.colorbar(im, ax=ax, label="log10 ‖h‖")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@styled
def pos0_curve(result: MechanismsResult, path: Path) -> None:
    plt = _plt()
    prof = result.tables["norm_profile"]
    shares = result.tables["layers"]
    form = result.summary["formation"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(prof["depth"], prof["pos0_norm"], "o-", ms=3, label="‖h₀‖ (position 0)", color=OKABE_ITO[1])
    ax.plot(prof["depth"], prof["median_norm"], "s-", ms=3, label="median ‖h_j‖, j ≥ 1", color=OKABE_ITO[0])
    plain_log_axis(ax, "y")
    ax.set_xlabel("depth (x.5: after attention + residual, x: after block)")
    ax.set_ylabel("ℓ2 norm (mean over prompts)")
    twin = ax.twinx()
    twin.bar(shares["layer"] + 0.5, shares["sink_share"], width=0.4, alpha=0.25, color=OKABE_ITO[2],
             label="sink share (α₀ > ε)")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("share of heads with α₀ > ε")
    if form.get("sink_layer") is not None:
        ax.axvline(form["sink_layer"] + 0.5, ls="--", color=OKABE_ITO[2], lw=1)
    if form.get("norm_depth") is not None:
        ax.axvline(form["norm_depth"], ls=":", color=OKABE_ITO[1], lw=1)
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left")
    ax.set_title(figure_title(result.summary["model"], "position-0 norm vs the median position"))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@styled
def bos_figure(result: MechanismsResult, path: Path) -> None:
    plt = _plt()
    layers = result.tables["bos_layers"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, group in layers.groupby("variant", sort=False):
        a.plot(group["layer"], group["sink_share"], "o-", ms=3, label=variant)
        b.plot(group["layer"], group["pos0_ratio_block"], "o-", ms=3, label=variant)
    a.set_xlabel("layer")
    a.set_ylabel("share of heads with α₀ > ε (position 0)")
    a.set_ylim(-0.02, 1.02)
    b.set_xlabel("layer")
    b.set_ylabel("‖h₀‖ / median ‖h_j‖ after the block")
    plain_log_axis(b, "y")
    a.legend()
    fig.suptitle(figure_title(result.summary["model"], "BOS removal"))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@styled
def similarity_figure(result: MechanismsResult, path: Path) -> None:
    plt = _plt()
    sim = result.tables["similarity"]
    variants = list(dict.fromkeys(sim["variant"]))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 5), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        grid = sim[sim["variant"] == variant].pivot_table(index="depth", columns="position", values="cos_sim")
        im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", vmin=-0.2, vmax=1)
        _depth_ticks(ax, grid.index.to_numpy())
        step = max(1, grid.shape[1] // 12)
        ax.set_xticks(range(0, grid.shape[1], step), [str(c) for c in grid.columns[::step]])
        ax.set_xlabel("position")
        ax.set_title(variant)
    axes[0][0].set_ylabel("depth")
    fig.colorbar(im, ax=axes[0].tolist(), label="mean cosine across inputs")
    fig.suptitle(figure_title(result.summary["model"], "cross-input similarity of hidden states"))
    fig.savefig(path)
    plt.close(fig)


@styled
def ablation_figure(result: MechanismsResult, path: Path) -> None:
    plt = _plt()
    prof = result.tables["ablation_profile"]
    base = prof[prof["ablation"] == "baseline"].set_index("layer")
    rows = [name for name in dict.fromkeys(prof["ablation"]) if name != "baseline"]
    n_layers = len(base)
    d_alpha = np.full((len(rows), n_layers), np.nan)
    d_ratio = np.full((len(rows), n_layers), np.nan)
    for r, name in enumerate(rows):
        g = prof[prof["ablation"] == name].set_index("layer")
        d_alpha[r] = (g["alpha0"] - base["alpha0"]).to_numpy()
        d_ratio[r] = np.log2(g["pos0_ratio_block"].to_numpy() / base["pos0_ratio_block"].to_numpy())
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, max(3, 0.22 * len(rows) + 1.5)))
    for ax, data, title in ((a, d_alpha, "Δ α₀ (ablated − baseline)"),
                            (b, d_ratio, "log2 of ‖h₀‖/median after the block, ablated / baseline")):
        lim = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
        im = ax.imshow(data, aspect="auto", cmap=DIVERGING_CMAP, vmin=-lim or -1, vmax=lim or 1)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(figure_title(result.summary["model"], "head ablation"))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


FIGURES = {
    "norm_heatmap.png": (norm_heatmap, "norms"),
    "pos0_norm.png": (pos0_curve, "norm_profile"),
    "bos_removal.png": (bos_figure, "bos_layers"),
    "similarity.png": (similarity_figure, "similarity"),
    "ablation.png": (ablation_figure, "ablation_profile"),
}


def write_figures(result: MechanismsResult, folder: Path) -> list[str]:
    """Write every figure whose table exists; return the file names written."""
    written = []
    for name, (draw, table) in FIGURES.items():
        frame = result.tables.get(table)
        if not isinstance(frame, pd.DataFrame) or frame.empty:
            continue
        draw(result, folder / name)
        written.append(name)
    return written
