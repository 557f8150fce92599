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

`attention_stats` is one `sinkscope.capture.run_capture` pass: the capture reads each variant's sink logits from its
attention modules (see `variants`), so the statistics come from the probabilities the variant really uses (tested
against the variants' own `variant_probs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import LlamaForCausalLM

from sinkscope.capture import CaptureConfig, pad_to, run_capture
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel, model_info
from sinkscope.store import load_run

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


@torch.no_grad()
def attention_stats(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,  # [B, N]
    attention_mask: torch.Tensor | None = None,  # [B, N] 1 for real tokens, right padding
    batch_size: int = 16,
) -> AttentionStats:
    """Run the model on `input_ids` under sinkscope's capture (`run_capture`, with the model's variant) and reduce
    it to sink statistics: key mass, the null mass (the learned sink's share, 1 − row sum), ‖h_i‖₂ after each
    decoder layer and the mean next-token loss. Runs in eval mode (restored afterwards), without autocast.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    n = input_ids.shape[1]
    lengths = attention_mask.sum(-1).cpu()  # [B]
    if not bool((attention_mask.cpu().bool() == (torch.arange(n)[None, :] < lengths[:, None])).all()) \
            or bool((lengths == 0).any()):
        raise SinkscopeError("attention_stats needs right padding: each row's real tokens first, then padding")
    name = getattr(model.config, "_name_or_path", None) or "tinylm"
    loaded = LoadedModel(model=model, tokenizer=None, info=model_info(model, None, name))
    config = CaptureConfig(rows=None, entropy=False, hidden=("block",), loss=True)
    prompts = [row[:length] for row, length in zip(input_ids.cpu(), lengths.tolist(), strict=True)]
    was_training = model.training
    model.eval()
    try:
        trace = run_capture(loaded, prompts, config, batch_size=batch_size, padding_side="right")
    finally:
        model.train(was_training)
    assert trace.hidden is not None and trace.nll_sum is not None and trace.nll_count is not None
    n_queries = trace.lengths[:, None, None].float()  # [B, 1, 1]
    null_mass = trace.sink_share.sum(-1) / n_queries if trace.sink_share is not None \
        else torch.zeros(trace.key_mass.shape[:3])  # [B, L, H]: sink_share is 1 − row sum, zero past each length
    return AttentionStats(
        key_mass=pad_to(trace.key_mass, n, [3]),
        null_mass=null_mass,
        norms=pad_to(trace.hidden.norm(dim=-1), n, [2]),  # block outputs [B, L, N], zeros at padding
        lengths=trace.lengths,
        loss=float(trace.nll_sum.sum()) / max(1, int(trace.nll_count.sum())),
    )


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



def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SinkscopeError(f"{path} is not a readable trace.parquet ({reason}); pass the folder written by "
                             "`sinkscope train-lm`, or train again") from None


def read_trace(run: str | Path) -> pd.DataFrame:
    """The trace table of a run folder (or a trace.parquet path)."""
    path = Path(run)
    if path.is_file():
        return _read_parquet(path)
    if (path / "trace.parquet").exists():
        return _read_parquet(path / "trace.parquet")
    if (path / "manifest.json").exists() and "trace" in load_run(path).tables:
        return load_run(path)["trace"]
    raise SinkscopeError(f"{run} has no trace.parquet: pass a folder written by `sinkscope train-lm`")
