"""The causal effect of each prompt token on the predicted label (beyond seed 000, which only asserts it).

    effect_j = log p(y | x) − log p(y | x with token j removed)         y the predicted label (all its tokens)

Two ways to remove token j (`mode`):

* "mask": no query attends to key j in any layer, the rows renormalised over the other keys
  (A'_ij = A_ij·[j ≠ k] / Σ_k' A_ik'·[j ≠ k']), as `sinkscope.capture.MaskKeys([j])` does. The token still sits
  in the sequence (its own hidden state and position are kept; only the information read from it is cut). This is
  seed 000's causal test: mask a token's attention and see what the output loses. Row 0 cannot lose key 0 (it has
  no other key) and is left as it is.
* "occlude": token j is deleted from the input (leave-one-out erasure, Li et al. 2016 "Understanding Neural
  Networks through Representation Erasure"); later tokens move up one position.

n prompt tokens cost n forward passes. They run in batches of copies of the same sequence (no padding), and
positions before j are never recomputed: their keys and values do not depend on token j (causal attention), so the
clean pass's KV cache up to the block's first position is reused (only for models whose cache is a plain
`DynamicCache`; others recompute from position 0, with the same result).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer

from sinkscope.capture import MaskKeyPerRow, intervene, use_sinkscope_attention
from sinkscope.capture.trace import forward_args, forward_inputs
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel

__all__ = ["CAUSAL_MODES", "CausalEffects", "MaskKeyPerRow", "causal_effects", "target_logprob"]

CAUSAL_MODES = ("mask", "occlude")


@dataclass
class CausalEffects:
    """Per-token causal effects on one example's predicted label.

    effects: [n] float, effect_j = base − log p(y | x without j); NaN where not computed
    base: log p(y | x) (summed over y's tokens)
    """

    effects: torch.Tensor
    base: float
    mode: str
    positions: list[int]


def target_logprob(logits: torch.Tensor, start: int, target: Sequence[int]) -> torch.Tensor:
    """Σ_t log softmax(logits[:, start + t])[target[t]]. logits [b, T, V] → [b]."""
    m = len(target)
    logprobs = torch.log_softmax(logits[:, start : start + m].float(), -1)  # [b, m, V]
    idx = torch.as_tensor(list(target), device=logits.device)
    return logprobs.gather(-1, idx[None, :, None].expand(logits.shape[0], m, 1)).sum((-1, -2))


def _reusable(cache: Any) -> bool:
    """Whether a prefix of this cache can be handed to later passes: a DynamicCache of plain full-attention layers."""
    return isinstance(cache, DynamicCache) and bool(cache.layers) and all(type(x) is DynamicLayer for x in cache.layers)


def _prefix(cache: DynamicCache, s: int, b: int) -> DynamicCache:
    """A new cache holding positions [0, s) of `cache` repeated for b batch rows (keys/values [b, kvh, s, d])."""
    data = [(x.keys[:, :, :s].expand(b, -1, -1, -1), x.values[:, :, :s].expand(b, -1, -1, -1)) for x in cache.layers]
    return DynamicCache(ddp_cache_data=data)


def _run(model: transformers.PreTrainedModel, ids: torch.Tensor, start: int, past: DynamicCache | None,
         use_cache: bool, keep: int) -> tuple[torch.Tensor, Any]:
    """Forward ids [b, t] that continue `past` (holding positions [0, start)); positions start … start + t − 1.

    Returns the logits of the last `keep` positions [b, keep, V] and the new cache (None unless use_cache).
    The cache argument is `cache` in newer transformers 5.x and `past_key_values` in older ones.
    """
    device = next(model.parameters()).device
    args = forward_args(model)
    inputs = forward_inputs(model, ids, torch.ones_like(ids), device, past=start, use_cache=use_cache)
    if "logits_to_keep" in args:
        inputs["logits_to_keep"] = keep
    name = "cache" if "cache" in args else "past_key_values"
    if past is not None:
        inputs[name] = past
    out = model(**inputs)
    return out.logits[:, -keep:], getattr(out, name, None) if use_cache else None


def causal_effects(
    loaded: LoadedModel,
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    *,
    mode: str = "mask",
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    reuse_prefix: bool = True,
) -> CausalEffects:
    """effect_j = log p(target | prompt) − log p(target | prompt with token j masked/occluded), j in `positions`.

    prompt_ids: the prompt's token ids (n, special tokens included); target_ids: the label's ids (m ≥ 1).
    positions: prompt positions to test (default all 0 … n−1). Returns effects [n], NaN elsewhere.
    """
    if mode not in CAUSAL_MODES:
        raise SinkscopeError(f"unknown causal mode '{mode}': use one of {', '.join(CAUSAL_MODES)}")
    n, m = len(prompt_ids), len(target_ids)
    if n == 0 or m == 0:
        raise SinkscopeError("causal effects need a non-empty prompt and target")
    todo = sorted(set(range(n) if positions is None else positions))
    if any(not 0 <= j < n for j in todo):
        raise SinkscopeError(f"causal positions must lie in [0, {n})")
    if mode == "occlude" and n == 1:
        todo = []  # deleting the only prompt token leaves nothing to predict from
    model = loaded.model
    seq = torch.tensor(list(prompt_ids) + list(target_ids[:-1]), dtype=torch.long)  # [n + m − 1]
    effects = torch.full((n,), float("nan"))
    with torch.inference_mode(), use_sinkscope_attention(model):
        logits, clean_cache = _run(model, seq[None], 0, None, use_cache=reuse_prefix, keep=m)
        base = float(target_logprob(logits, 0, target_ids)[0])
        cache = clean_cache if reuse_prefix and _reusable(clean_cache) else None
        for b0 in range(0, len(todo), batch_size):
            block = todo[b0 : b0 + batch_size]
            # the first recomputed position: keys before it are the clean ones (occlusion keeps ≥ 1 prompt token)
            s = 0 if cache is None else (block[0] if mode == "mask" else min(block[0], n - 2))
            context: AbstractContextManager[Any]
            if mode == "mask":
                ids = seq[s:][None].expand(len(block), -1)
                context = intervene(model, MaskKeyPerRow(keys=block))
            else:
                ids = torch.stack([torch.cat([seq[s:j], seq[j + 1 :]]) for j in block])
                context = nullcontext()
            past = _prefix(cache, s, len(block)) if cache is not None and s > 0 else None
            with context:
                logits, _ = _run(model, ids, s, past, use_cache=False, keep=m)
            # the target's m tokens are predicted by the last m positions of every input
            effects[block] = base - target_logprob(logits, 0, target_ids).float().cpu()
    return CausalEffects(effects=effects, base=base, mode=mode, positions=todo)
