"""Over-mixing and representation entropy: how far a perturbation of one token spreads, with the sink and without it
(Barbero et al. 2025, "Why do LLMs attend to the first token?", arXiv:2504.02732), and how compressed each layer's
representation is (Queipo-de-Llano et al. 2025, "Attention sinks and compression valleys in LLMs are two sides of
the same coin", arXiv:2510.06477).

Spread. Barbero et al. argue that attention on the first token slows the mixing of information across positions: a
head that puts its mass on the sink passes little of a perturbed token on. sinkscope perturbs the input embedding of
token i by δ = ε·r·u, u a seeded random unit vector and r the root-mean-square norm of the rows of the model's
input-embedding matrix (so ε is relative to a typical token embedding), and reads per layer ℓ and position j

    spread_ℓ,j = ‖h'_ℓ,j − h_ℓ,j‖ / ‖h_ℓ,j‖

(h the residual stream after block ℓ, layer −1 the embeddings; h' with the perturbation) — a finite difference of
the Jacobian ∂h_ℓ,j/∂x_i along u. The two conditions: the sink intact, and the sink key masked in every layer and
head with `MaskKeys` (its attention renormalised onto the other keys), both runs of a pair under the same condition.

Representation entropy (Queipo-de-Llano et al., after the matrix-based entropy of Skean et al. 2025): for the real
tokens' hidden states H_ℓ ∈ ℝ^{n×d} of one prompt (not centred), with singular values σ_k,

    p_k = σ_k² / Σ_m σ_m²,    S_ℓ = −Σ_k p_k log p_k  (nats),    S_ℓ / log min(n, d) ∈ [0, 1].

A massive first-token norm makes one direction dominate (low S: a "compression valley"). Beside it: the BOS sink
rate (Gu et al. 2024, "When attention sink emerges in language models", whose metric Barbero et al. use): the share
of a layer's heads with α₀ = mean_i A_{i,0} > ε_sink = 0.3, and ‖h_0‖ against the median ‖h_j‖ of the other tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from sinkscope.capture import CaptureConfig, MaskKeys, intervene, run_capture
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress

CONDITIONS = ("intact", "masked")


@dataclass
class OvermixingResult:
    """Tables, a summary and the parameters of one `overmixing` run."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    params: dict[str, Any]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def _repr_html_(self) -> str:
        """A notebook view: the summary or parameters and each table's first rows (`report.notebook`)."""
        from sinkscope.report.notebook import result_html

        return result_html(self)


def perturbation(model: torch.nn.Module, eps: float, seed: int = 0) -> torch.Tensor:
    """δ = ε·r·u [d] (float32): u a unit vector drawn from N(0, I) with `seed`, r the RMS norm of the rows of the
    input-embedding matrix."""
    weight = model.get_input_embeddings().weight.detach()  # [V, d]
    r = float(weight.float().pow(2).sum(-1).mean().sqrt())
    u = torch.randn(weight.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (eps * r * u / u.norm()).float()


def relative_change(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """‖h' − h‖ / ‖h‖ over the last dim: [..., d] → [...] (NaN where ‖h‖ = 0, at padding)."""
    diff = torch.linalg.vector_norm(perturbed.double() - clean.double(), dim=-1)
    norm = torch.linalg.vector_norm(clean.double(), dim=-1)
    return torch.where(norm > 0, diff / norm.clamp(min=1e-300), torch.nan)


def representation_entropy(h: torch.Tensor) -> tuple[float, float]:
    """(S, S / log min(n, d)) of h [n, d]: the Shannon entropy of p_k = σ_k² / Σ σ² (nats), σ the singular values
    of h (float64, not centred). One token: (0, 0)."""
    s = torch.linalg.svdvals(h.double())
    p = s.pow(2) / s.pow(2).sum().clamp(min=1e-300)
    entropy = float(-torch.special.xlogy(p, p).sum())
    bound = math.log(min(h.shape))
    return entropy, entropy / bound if bound > 0 else 0.0


def _capture(loaded: LoadedModel, ids: list[list[int]], config: CaptureConfig, masked: bool, sink: int,
             delta: tuple[int, torch.Tensor] | None, batch_size: int) -> Any:
    """One capture of `ids` (right padding, so prompt positions are key positions), under MaskKeys([sink]) when
    `masked`, with the embedding perturbation `delta`."""
    if masked:
        with intervene(loaded.model, MaskKeys(positions=[sink])):
            return run_capture(loaded, ids, config, batch_size=batch_size, padding_side="right", embed_delta=delta)
    return run_capture(loaded, ids, config, batch_size=batch_size, padding_side="right", embed_delta=delta)


def overmixing(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    position: int = 1,
    eps: float = 0.01,
    sink: int = 0,
    sink_threshold: float = 0.3,
    seed: int = 0,
    max_tokens: int | None = 128,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> OvermixingResult:
    """Perturbation spread and representation entropy per layer, with the sink intact and masked (module docstring).

    position: the perturbed token i; eps: ε, relative to the RMS embedding norm; sink: the masked key (≥ 0);
    sink_threshold: ε_sink of the sink rate; max_tokens: prompts are cut to this many tokens; progress: called as
    `update(task, done, total)` after each chunk of prompts. Prompts without a token after i are skipped.

    Tables (key columns prompt_id, layer, position, token; layer −1 is the embeddings):
    - spread: condition × prompt × layer × position: offset = j − i, rel_change;
    - layer_entropy: condition × prompt × layer: entropy, entropy_norm, sink_rate, bos_norm, median_norm, bos_ratio;
    - layers: condition × layer, the curves: spread_mean / spread_median / spread_last (over prompts and the
      positions j > i of a decoder, j ≠ i of an encoder; _last: each prompt's last token), and the means of the
      layer_entropy columns.
    """
    if not eps > 0:
        raise SinkscopeError(f"the perturbation size ε must be positive, got {eps}")
    if sink < 0 or position < 0:
        raise SinkscopeError("the sink and the perturbed position are positions from the start (≥ 0)")
    if position == sink:
        raise SinkscopeError(f"the perturbed position {position} is the sink itself; perturb another token")
    if not 0 < sink_threshold < 1:
        raise SinkscopeError(f"the sink-rate threshold must be in (0, 1), got {sink_threshold}")
    ids, kept, bad = _prepare(loaded, prompts, position, sink, max_tokens)
    if not ids:
        reasons = "; ".join(f"prompt {i + 1}: {why}" for i, why in bad[:3])
        raise SinkscopeError(f"no usable prompt ({reasons})" if bad else "no prompts given")
    delta = perturbation(loaded.model, eps, seed)
    config = CaptureConfig(rows=None, entropy=False, hidden=["embed", "block"])
    causal = loaded.info.is_causal
    spread_frames, entropy_frames = [], []
    chunks = [range(c, min(c + batch_size, len(ids))) for c in range(0, len(ids), batch_size)]
    for chunk in chunks:  # one batch at a time: the [b, sites, n, d] states are freed after each
        part = [ids[k] for k in chunk]
        for condition in CONDITIONS:
            masked = condition == "masked"
            clean = _capture(loaded, part, config, masked, sink, None, batch_size)
            moved = _capture(loaded, part, config, masked, sink, (position, delta), batch_size)
            pids = [kept[k] for k in chunk]
            spread_frames.append(_spread_frame(condition, pids, clean, moved, position))
            entropy_frames.append(_entropy_frame(condition, pids, clean, sink, sink_threshold))
            del clean, moved
        if progress is not None:
            progress("prompts", chunk.stop, len(ids))
    spread = pd.concat(spread_frames, ignore_index=True)
    entropy = pd.concat(entropy_frames, ignore_index=True)
    layers = layer_curves(spread, entropy, causal)
    params = {"position": position, "eps": eps, "delta_norm": float(delta.norm()), "sink": sink,
              "sink_threshold": sink_threshold, "seed": seed, "max_tokens": max_tokens, "n_prompts": len(ids)}
    tables = {
        "prompts": pd.DataFrame({"prompt_id": kept, "text": [prompts[i] for i in kept],
                                 "n_tokens": [len(s) for s in ids]}),
        "skipped": pd.DataFrame({"prompt_id": [i for i, _ in bad], "reason": [w for _, w in bad]}
                                ).astype({"prompt_id": "int64", "reason": "object"}),
        "spread": spread,
        "layer_entropy": entropy,
        "layers": layers,
    }
    return OvermixingResult(tables=tables, summary=summarise(layers, loaded.info.name, params), params=params,
                            skipped=bad)


def _prepare(loaded: LoadedModel, prompts: Sequence[str], position: int, sink: int, max_tokens: int | None
             ) -> tuple[list[list[int]], list[int], list[tuple[int, str]]]:
    """Token ids cut to `max_tokens`, the kept indices, and (index, reason) for prompts without a token after both
    the perturbed position and the sink, or longer than the context."""
    from sinkscope.analyses.dormant import truncate

    ids, kept, bad = [], [], []
    need = max(position, sink) + 2
    limit = loaded.info.max_positions
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            bad.append((i, "empty prompt"))
            continue
        seq = truncate(loaded.tokenizer, text, max_tokens)
        if limit is not None and len(seq) > limit:
            bad.append((i, f"{len(seq)} tokens, more than the model's context of {limit}; lower the token limit"))
        elif len(seq) < need:
            bad.append((i, f"{len(seq)} token(s): perturbing position {position} needs a later token"))
        else:
            ids.append(seq)
            kept.append(i)
    return ids, kept, bad


def _spread_frame(condition: str, pids: list[int], clean: Any, moved: Any, position: int) -> pd.DataFrame:
    """One row per prompt, site and real position: rel_change = ‖h' − h‖ / ‖h‖."""
    change = relative_change(clean.hidden, moved.hidden)  # [P, S, N]
    layers = [s.layer for s in clean.sites]
    frames = []
    for p, pid in enumerate(pids):
        n = int(clean.lengths[p])
        frames.append(pd.DataFrame({
            "condition": condition,
            "prompt_id": pid,
            "layer": np.repeat(np.asarray(layers, dtype=np.int64), n),
            "position": np.tile(np.arange(n, dtype=np.int64), len(layers)),
            "token": np.tile(np.asarray(clean.tokens[p], dtype=object), len(layers)),
            "offset": np.tile(np.arange(n, dtype=np.int64) - position, len(layers)),
            "rel_change": change[p, :, :n].reshape(-1).numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def sink_rate(key_mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """Gu et al.'s sink rate per prompt and layer: the share of heads with α₀ > threshold. key_mass [P, L, H, N]
    → [P, L]."""
    return (key_mass[..., 0] > threshold).float().mean(-1)


def _entropy_frame(condition: str, pids: list[int], clean: Any, sink: int, threshold: float) -> pd.DataFrame:
    """One row per prompt and site: representation entropy, sink rate (NaN at the embeddings), ‖h_sink‖ and the
    median ‖h_j‖ of the other real tokens."""
    rate = sink_rate(clean.key_mass, threshold)  # [P, L]
    rows = []
    for p, pid in enumerate(pids):
        n = int(clean.lengths[p])
        for s, site in enumerate(clean.sites):
            h = clean.hidden[p, s, :n]  # [n, d]
            norms = torch.linalg.vector_norm(h.double(), dim=-1)
            others = torch.cat([norms[:sink], norms[sink + 1:]])
            entropy, entropy_norm = representation_entropy(h)
            bos, median = float(norms[sink]), float(others.median())
            rows.append({"condition": condition, "prompt_id": pid, "layer": site.layer, "position": sink,
                         "token": clean.tokens[p][sink], "entropy": entropy, "entropy_norm": entropy_norm,
                         "sink_rate": float(rate[p, site.layer]) if site.layer >= 0 else float("nan"),
                         "bos_norm": bos, "median_norm": median, "bos_ratio": bos / median if median > 0 else
                         float("nan")})
    return pd.DataFrame(rows)


def layer_curves(spread: pd.DataFrame, entropy: pd.DataFrame, causal: bool) -> pd.DataFrame:
    """The per-layer curves of both conditions: spread over the positions after i (decoder) or other than i
    (encoder), and the means of the entropy table."""
    others = spread[spread["offset"] > 0] if causal else spread[spread["offset"] != 0]
    last = others[others["position"] == others.groupby("prompt_id")["position"].transform("max")]
    curves = (others.groupby(["condition", "layer"], sort=False)["rel_change"]
              .agg(spread_mean="mean", spread_median="median").reset_index())
    curves = curves.merge(last.groupby(["condition", "layer"], sort=False)["rel_change"].mean()
                          .rename("spread_last").reset_index(), on=["condition", "layer"])
    means = (entropy.groupby(["condition", "layer"], sort=False)[
        ["entropy", "entropy_norm", "sink_rate", "bos_norm", "median_norm", "bos_ratio"]].mean().reset_index())
    return curves.merge(means, on=["condition", "layer"]).sort_values(["condition", "layer"], ignore_index=True)


def summarise(layers: pd.DataFrame, model: str, params: dict[str, Any]) -> dict[str, Any]:
    """Per condition: the spread at the last layer and its mean over layers, the lowest entropy (the valley) and its
    layer, the mean sink rate and the peak ‖h₀‖ / median; the masked / intact spread ratio at the last layer."""
    out: dict[str, Any] = {"model": model, "position": params["position"], "eps": params["eps"],
                           "n_prompts": params["n_prompts"], "conditions": {}}
    for condition, group in layers.groupby("condition", sort=False):
        blocks = group[group["layer"] >= 0]
        valley = blocks.loc[blocks["entropy"].idxmin()]
        out["conditions"][str(condition)] = {
            "spread_last_layer": float(blocks["spread_mean"].iloc[-1]),
            "spread_mean": float(blocks["spread_mean"].mean()),
            "entropy_min": float(valley["entropy"]), "entropy_min_layer": int(valley["layer"]),
            "sink_rate_mean": float(blocks["sink_rate"].mean()),
            "bos_ratio_max": float(blocks["bos_ratio"].max()),
        }
    c = out["conditions"]
    if {"intact", "masked"} <= set(c) and c["intact"]["spread_last_layer"] > 0:
        out["masked_over_intact"] = c["masked"]["spread_last_layer"] / c["intact"]["spread_last_layer"]
    return out
