"""Sink statistics of a tiny LM and its emergence trace: `attention_stats`, `trace_rows`, `summarise`, and reading
and drawing a run's `trace.parquet`.

Per layer l and head h, on a fixed held-out batch (Gu et al. 2025, "When Attention Sink Emerges in Language Models"):

    α₀[l, h]   column mass of position 0: mean over the queries i that see key 0 of A_i0 (sinkscope `column_mass`)
    share_ε[l] fraction of heads of layer l with α₀ > ε, for ε = 0.2 and 0.3 (sinkscope `sink_rate`)
    norm_ratio ‖h_0‖₂ / median_{i≥1} ‖h_i‖₂ of the residual stream after layer l (massive activations at the sink)
    null_mass  mean over queries of 1 − Σ_j A_ij (the share that goes to the extra/learned logit; 0 for softmax)

`trace.parquet` columns (`TRACE_COLUMNS`): step, tokens (seen so far), layer, head, alpha0, null_mass, sink_02 and
sink_03 (α₀ > ε for this head), share_02 and share_03 (per layer), norm0 and norm_median (‖h_0‖ and the median
‖h_i‖, i ≥ 1, per layer), norm_ratio, eval_loss (held-out batch), train_loss (mean over the steps since the previous
evaluation; at step 0 the untrained model's loss on the first batch), lr, time_s.

The statistics come from the probabilities the model's variant really uses; for softmax models they equal
sinkscope's capture `key_mass` (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import LlamaForCausalLM

from sinkscope.capture import attention_implementation
from sinkscope.errors import SinkscopeError
from sinkscope.store import load_run
from sinkscope.toy.tinylm.variants import ATTN_NAMES, RECORDING, Recorder, variant_of

EPSILONS: tuple[float, ...] = (0.2, 0.3)
TRACE_COLUMNS: tuple[str, ...] = (
    "step", "tokens", "layer", "head", "alpha0", "null_mass", "sink_02", "sink_03", "share_02", "share_03",
    "norm0", "norm_median", "norm_ratio", "eval_loss", "train_loss", "lr", "time_s",
)


@dataclass
class AttentionStats:
    """Sink statistics of one batch (B sequences, L layers, H heads, N positions; right padding only)."""

    key_mass: torch.Tensor  # [B, L, H, N]  α_k = mean over the queries that see key k of A_ik
    null_mass: torch.Tensor  # [B, L, H]  mean over queries of 1 − Σ_k A_ik
    norms: torch.Tensor  # [B, L, N]  ‖h_i‖₂ of the residual stream after each layer
    lengths: torch.Tensor  # [B]
    loss: float  # mean next-token cross-entropy (nats)

    def alpha0(self) -> torch.Tensor:
        """[L, H]: α₀ averaged over the batch."""
        return self.key_mass[..., 0].mean(0)

    def sink_share(self, eps: float) -> torch.Tensor:
        """[L]: fraction of heads whose batch-mean α₀ exceeds ε (Gu et al. 2025 sink rate, per layer)."""
        return (self.alpha0() > eps).float().mean(-1)

    def norm0(self) -> torch.Tensor:
        """[L]: mean over the batch of ‖h_0‖₂."""
        return self.norms[..., 0].mean(0)

    def norm_median(self) -> torch.Tensor:
        """[L]: mean over the batch of the median over positions 1..len−1 of ‖h_i‖₂."""
        meds = [self.norms[b, :, 1 : int(n)].median(-1).values for b, n in enumerate(self.lengths)]
        return torch.stack(meds).mean(0)

    def norm_ratio(self) -> torch.Tensor:
        """[L]: mean over the batch of ‖h_0‖₂ / median_{i≥1} ‖h_i‖₂."""
        ratios = [self.norms[b, :, 0] / self.norms[b, :, 1 : int(n)].median(-1).values
                  for b, n in enumerate(self.lengths)]
        return torch.stack(ratios).mean(0)


def _norm_hook(norms: list[torch.Tensor]) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
        """Forward hook on a decoder layer: append ‖h_i‖₂ of its output [b, n]."""
        norms.append((out[0] if isinstance(out, tuple) else out).float().norm(dim=-1))

    return hook


@torch.no_grad()
def attention_stats(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,  # [B, N]
    attention_mask: torch.Tensor | None = None,  # [B, N] 1 for real tokens, right padding
    batch_size: int = 16,
) -> AttentionStats:
    """Run the model on `input_ids` and reduce the attention weights its variant really uses to sink statistics.

    For a softmax model `key_mass` equals sinkscope's capture `Trace.key_mass` on the same tokens. Runs in eval
    mode, in float32 statistics, without autocast.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, 0] == 0).any()):
        raise SinkscopeError("attention_stats needs right padding (position 0 must be a real token)")
    variant = variant_of(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: list[dict[str, torch.Tensor]] = []
    total_loss, total_tokens = 0.0, 0
    layers = model.model.layers
    try:
        with attention_implementation(model, ATTN_NAMES[variant]):
            for i in range(0, input_ids.shape[0], batch_size):
                ids, mask = input_ids[i : i + batch_size].to(device), attention_mask[i : i + batch_size].to(device)
                norms: list[torch.Tensor] = []
                hooks = [layer.register_forward_hook(_norm_hook(norms)) for layer in layers]
                rec = Recorder(query_valid=mask.bool())
                token = RECORDING.set(rec)
                try:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                finally:
                    RECORDING.reset(token)
                    for h in hooks:
                        h.remove()
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                   ignore_index=-100, reduction="sum")
                total_loss += float(loss)
                total_tokens += int((labels != -100).sum())
                stack = {k: torch.stack([r[k] for r in rec.layers], dim=1) for k in rec.layers[0]}
                parts.append({
                    "key_mass": stack["key_mass_sum"] / stack["key_count"][:, :, None].clamp(min=1),
                    "null_mass": stack["null_sum"] / stack["n_queries"][:, :, None].clamp(min=1),
                    "norms": torch.stack([n.cpu() for n in norms], dim=1) * mask.cpu()[:, None, :],
                    "lengths": mask.sum(-1).cpu(),
                })
    finally:
        model.train(was_training)
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return AttentionStats(key_mass=merged["key_mass"], null_mass=merged["null_mass"], norms=merged["norms"],
                          lengths=merged["lengths"], loss=total_loss / max(1, total_tokens))


def trace_rows(step: int, tokens: int, stats: AttentionStats, train_loss: float, lr: float, time_s: float
               ) -> pd.DataFrame:
    """One evaluation as tidy rows: one per (layer, head), with layer- and step-level values repeated."""
    alpha = stats.alpha0().numpy()  # [L, H]
    n_layers, n_heads = alpha.shape
    layer = np.repeat(np.arange(n_layers), n_heads)
    per_layer = {
        "share_02": stats.sink_share(0.2).numpy(), "share_03": stats.sink_share(0.3).numpy(),
        "norm0": stats.norm0().numpy(), "norm_median": stats.norm_median().numpy(),
        "norm_ratio": stats.norm_ratio().numpy(),
    }
    df = pd.DataFrame({
        "step": step, "tokens": tokens, "layer": layer, "head": np.tile(np.arange(n_heads), n_layers),
        "alpha0": alpha.ravel(), "null_mass": stats.null_mass.mean(0).numpy().ravel(),
        "sink_02": alpha.ravel() > 0.2, "sink_03": alpha.ravel() > 0.3,
        **{k: v[layer] for k, v in per_layer.items()},
        "eval_loss": stats.loss, "train_loss": train_loss, "lr": lr, "time_s": time_s,
    })
    df["step"] = df["step"].astype("int64")
    df["tokens"] = df["tokens"].astype("int64")
    return df[list(TRACE_COLUMNS)]


def summarise(stats: AttentionStats) -> dict[str, Any]:
    """Per-layer sink figures of one batch, as plain numbers (the content of a model card's sinks.json)."""
    alpha = stats.alpha0()
    layers = [
        {"layer": i, "alpha0_mean": float(alpha[i].mean()), "share_02": float(stats.sink_share(0.2)[i]),
         "share_03": float(stats.sink_share(0.3)[i]), "norm_ratio": float(stats.norm_ratio()[i]),
         "null_mass": float(stats.null_mass.mean(0)[i].mean())}
        for i in range(alpha.shape[0])
    ]
    later = alpha[1:] if alpha.shape[0] > 1 else alpha
    return {
        "eval_loss": stats.loss,
        "layers": layers,
        "alpha0": alpha.tolist(),
        "sink_rate_03": float((alpha > 0.3).float().mean()),
        "sink_rate_02": float((alpha > 0.2).float().mean()),
        "target_met": bool(((later > 0.3).float().mean(-1) >= 0.5).all()),
    }



def read_trace(run: str | Path) -> pd.DataFrame:
    """The trace table of a run folder (or a trace.parquet path)."""
    path = Path(run)
    if path.is_file():
        return pd.read_parquet(path)
    if (path / "trace.parquet").exists():
        return pd.read_parquet(path / "trace.parquet")
    if (path / "manifest.json").exists() and "trace" in load_run(path).tables:
        return load_run(path)["trace"]
    raise SinkscopeError(f"{run} has no trace.parquet: pass a folder written by `sinkscope train-lm`")


def draw_trace(trace: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Plot a trace: α₀ (mean over heads), share of heads with α₀ > 0.3 (and 0.2, dashed), ‖h₀‖/median‖h‖ per
    layer, and train/eval loss, against the optimizer step. Writes a PNG (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
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
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, n_layers))
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
    axes[1, 0].set(title="‖h₀‖ / median ‖hᵢ‖ after each layer", ylabel="ratio", yscale="log")
    axes[1, 1].plot(steps["step"], steps["eval_loss"], label="held-out")
    axes[1, 1].plot(steps["step"], steps["train_loss"], label="train (mean of last steps)")
    axes[1, 1].set(title="loss (nats/token)", ylabel="loss")
    axes[0, 0].legend(fontsize=8)
    axes[1, 1].legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

