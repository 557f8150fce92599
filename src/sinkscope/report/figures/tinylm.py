"""The tiny LM's emergence trace (`sinkscope train-lm`, `sinkscope plot-trace`): α₀, the share of sink heads, the
position-0 norm ratio and the loss against the optimizer step (matplotlib, Agg, in `report.palette`'s style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.report.palette import HEATMAP_CMAP, OKABE_ITO, figure_title, plain_log_axis, styled
from sinkscope.toy.tinylm.statistics import TRACE_COLUMNS


@styled
def draw_trace(trace: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Plot a trace: α₀ (mean over heads), share of heads with α₀ > 0.3 (and 0.2, dashed), ‖h₀‖/median‖h‖ per
    layer, and train/eval loss, against the optimizer step. Writes a PNG (matplotlib, Agg backend)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise SinkscopeError("plotting needs matplotlib: pip install matplotlib") from None
    missing = set(TRACE_COLUMNS) - set(trace.columns)
    if missing or trace.empty:
        raise SinkscopeError(f"not a train-lm trace (missing columns {sorted(missing)} or no rows)")
    per_layer = trace.groupby(["step", "layer"], as_index=False).agg(
        alpha0=("alpha0", "mean"), share_02=("share_02", "first"), share_03=("share_03", "first"),
        norm_ratio=("norm_ratio", "first"))
    steps = trace.groupby("step", as_index=False).agg(eval_loss=("eval_loss", "first"),
                                                       train_loss=("train_loss", "first"))
    n_layers = int(trace["layer"].max()) + 1
    colors = plt.get_cmap(HEATMAP_CMAP)(np.linspace(0, 0.9, n_layers))  # layers in depth order
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for layer in range(n_layers):
        d = per_layer[per_layer["layer"] == layer]
        kw = {"color": colors[layer], "label": f"layer {layer}"}
        axes[0, 0].plot(d["step"], d["alpha0"], **kw)
        axes[0, 1].plot(d["step"], d["share_03"], **kw)
        axes[0, 1].plot(d["step"], d["share_02"], color=colors[layer], ls="--", lw=0.8)
        axes[1, 0].plot(d["step"], d["norm_ratio"], **kw)
    axes[0, 0].set(title="α₀: attention mass on position 0 (mean over heads)", ylabel="α₀", ylim=(0, 1))
    axes[0, 1].set(title="share of heads with α₀ > 0.3 (dashed: > 0.2)", ylabel="share", ylim=(-0.02, 1.02))
    axes[1, 0].set(title="‖h₀‖ / median ‖hᵢ‖ after each layer", ylabel="ratio")
    plain_log_axis(axes[1, 0], "y")
    axes[1, 1].plot(steps["step"], steps["eval_loss"], color=OKABE_ITO[0], label="held-out")
    axes[1, 1].plot(steps["step"], steps["train_loss"], color=OKABE_ITO[1], ls="--", label="train (mean of last steps)")
    axes[1, 1].set(title="loss (nats/token)", ylabel="loss")
    axes[0, 0].legend()
    axes[1, 1].legend()
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(figure_title(title))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
