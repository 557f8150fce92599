"""StreamingLLM (Xiao et al. 2024): a KV cache that keeps the first `sink` tokens plus a recent window.

Tokens are fed one at a time; when the cache exceeds its budget, the oldest window token is evicted and the kept
window keys are re-positioned: each key is rotated by RoPE(−1) so that every cached key sits at its index *in the
cache*, and the next query takes position `len(cache)`, as the original implementation does. Policies compared at the
same cache budget (sink + window entries):

- `full`: no eviction;
- `sink_window`: the first `sink` tokens + the last `window` tokens;
- `window`: the last `sink + window` tokens only (the sinks are evicted like any other token).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel

POLICIES = ("full", "sink_window", "window")


@dataclass
class StreamResult:
    """Per-token negative log-likelihoods of one policy. nll[t] is −log p(x_{t+1} | cache after x_t)."""

    policy: str
    sink: int
    window: int
    nll: torch.Tensor  # [T − 1]

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll)


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL); NaN for no tokens."""
    return math.exp(float(nll.mean())) if nll.numel() else float("nan")


def _rotary(loaded: LoadedModel) -> tuple[torch.nn.Module, object]:
    """The model's rotary embedding module and its `rotate_half`, or a clear error for models without RoPE."""
    base = getattr(loaded.model, "model", loaded.model)
    rotary = getattr(base, "rotary_emb", None)
    rotate_half = getattr(sys.modules[type(loaded.model).__module__], "rotate_half", None)
    if rotary is None or rotate_half is None:
        raise SinkscopeError(
            f"{loaded.info.model_type} has no rotary position embedding: sink + window caching needs a RoPE model "
            "(Llama, Mistral, Qwen, SmolLM2, ...)"
        )
    return rotary, rotate_half


def shift_keys(keys: torch.Tensor, delta: int, loaded: LoadedModel) -> torch.Tensor:
    """Move RoPE-rotated keys by `delta` positions: k(p + δ) = k(p)·cos(δθ) + rotate_half(k(p))·sin(δθ).

    keys: [batch, kv_head, n, head_dim] → same shape. Exact because RoPE rotations compose: R(p+δ) = R(δ)R(p).
    """
    rotary, rotate_half = _rotary(loaded)
    position = torch.full((1, 1), delta, dtype=torch.long, device=keys.device)
    cos, sin = rotary(keys.float(), position)  # [1, 1, rot_dim]
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    cos, sin = cos / scale, sin / scale
    if cos.shape[-1] != keys.shape[-1]:
        raise SinkscopeError("partial rotary embeddings are not supported by the sink + window cache")
    shifted = keys.float() * cos[:, None] + rotate_half(keys.float()) * sin[:, None]
    return shifted.to(keys.dtype)


def _evict(cache: DynamicCache, keep_first: int, loaded: LoadedModel) -> None:
    """Drop the cache entry at index `keep_first` and shift the later keys back by one position."""
    for layer in cache.layers:
        keys, values = layer.keys, layer.values  # [b, kvh, n, d]
        tail_k = shift_keys(keys[:, :, keep_first + 1 :], -1, loaded)
        layer.keys = torch.cat([keys[:, :, :keep_first], tail_k], dim=2)
        layer.values = torch.cat([values[:, :, :keep_first], values[:, :, keep_first + 1 :]], dim=2)


def stream_nll(loaded: LoadedModel, ids: Sequence[int], policy: str, sink: int = 4, window: int = 256,
               progress: bool = False) -> StreamResult:
    """Feed `ids` one token at a time under a cache policy and return each next-token NLL."""
    if policy not in POLICIES:
        raise SinkscopeError(f"unknown cache policy '{policy}': use one of {', '.join(POLICIES)}")
    if sink < 0 or window < 1:
        raise SinkscopeError("--sink must be ≥ 0 and --window ≥ 1")
    if len(ids) < 2:
        raise SinkscopeError("the text is too short: it needs at least two tokens")
    if policy != "full":
        _rotary(loaded)
    model = loaded.model
    budget = sink + window
    keep_first = sink if policy == "sink_window" else 0
    cache = DynamicCache(config=model.config)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = torch.tensor(list(ids), device=loaded.device)
    nll = torch.empty(len(ids) - 1)
    steps = range(len(ids) - 1)
    if progress:
        from rich.progress import track

        steps = track(steps, description=f"{policy:>11}", transient=True)
    with torch.inference_mode():
        for t in steps:
            position = cache.get_seq_length()
            pos = torch.tensor([[position]], device=tokens.device)
            out = model(input_ids=tokens[t : t + 1][None], position_ids=pos, use_cache=True, **{cache_arg: cache})
            logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            nll[t] = -logp[tokens[t + 1]].cpu()
            if policy != "full" and cache.get_seq_length() > budget:
                _evict(cache, keep_first, loaded)
    return StreamResult(policy=policy, sink=sink, window=window, nll=nll)


def compare(loaded: LoadedModel, ids: Sequence[int], sink: int = 4, window: int = 256,
            policies: Sequence[str] = POLICIES, progress: bool = False) -> list[StreamResult]:
    """Run every policy on the same tokens."""
    return [stream_nll(loaded, ids, p, sink, window, progress) for p in policies]
