"""StreamingLLM (Xiao et al. 2024): a KV cache that keeps the first `sink` tokens plus a recent window, for texts of
any length.

Tokens are fed one at a time; when the cache exceeds its budget, the oldest window token is evicted. In the original
implementation every kept key is then re-rotated by RoPE(−1) so that each sits at its index *in the cache* and the
next query takes position `len(cache)`; rotated step by step, a key accumulates one rounding per step (in bfloat16,
a relative key error of 0.1 after 250 steps). Only relative positions matter to RoPE attention, so here each key
keeps the rotation it was computed with and the query takes its own position in the text:

- a window key at text position p is seen from the query at t at distance t − p, as in the cache-index frame;
- a sink key j must be seen at distance budget − j (its cache-index distance): it is rotated once, from the key
  as first computed, to position t − budget + j before each step (O(sink) work);
- positions stay below the model's context: when the query would reach it, every cached key is rotated back once by
  the same amount (a key lives `window` steps, so it is rebased at most once when the context exceeds sink +
  2·window).

So every cached key is at most one rotation (two with a rebase) away from the model's own computation, and a step
costs the model's incremental decode plus the eviction's copy. Policies compared at the same cache budget
(sink + window entries):

- `full`: no eviction — scored only up to the model's context (`StreamResult.n_tokens` says how far);
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
from sinkscope.progress import Progress

POLICIES = ("full", "sink_window", "window")


@dataclass
class StreamResult:
    """Per-token negative log-likelihoods of one policy. nll[t] is −log p(x_{t+1} | cache after x_t)."""

    policy: str
    sink: int
    window: int
    nll: torch.Tensor  # [T − 1]  (full: T is at most the model's context)

    @property
    def n_tokens(self) -> int:
        """How many tokens were fed (the scored predictions are one fewer)."""
        return self.nll.numel() + 1

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


def context_length(loaded: LoadedModel) -> int | None:
    """The model's context (max_position_embeddings or n_positions), None if the config does not say."""
    config = loaded.model.config
    get = getattr(config, "get_text_config", None)
    config = get() if callable(get) else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _SinkWindowCache:
    """The cache bookkeeping of one sink + window stream (module docstring): eviction, the sinks' one rotation per
    step from their first keys, and rebasing positions below the context."""

    def __init__(self, loaded: LoadedModel, cache: DynamicCache, sink: int, budget: int) -> None:
        self.loaded, self.cache, self.sink, self.budget = loaded, cache, sink, budget
        self.first_sinks: list[torch.Tensor] | None = None  # per layer [b, kvh, sink, d] as first computed
        self.offset = 0  # text position − model position

    def evict(self, n: int = 1) -> None:
        """Drop the `n` oldest window entries (from index `sink`) of every layer, keeping the others' rotations."""
        s = self.sink
        for layer in self.cache.layers:
            layer.keys = torch.cat([layer.keys[:, :, :s], layer.keys[:, :, s + n:]], dim=2)
            layer.values = torch.cat([layer.values[:, :, :s], layer.values[:, :, s + n:]], dim=2)

    def place_sinks(self, t: int) -> None:
        """Before the query at text position t: sink j at model position t − offset − budget + j (one rotation of
        its first key)."""
        if not self.sink:
            return
        if self.first_sinks is None:
            self.first_sinks = [layer.keys[:, :, : self.sink].clone() for layer in self.cache.layers]
        delta = t - self.offset - self.budget
        for layer, first in zip(self.cache.layers, self.first_sinks, strict=True):
            layer.keys[:, :, : self.sink] = shift_keys(first, delta, self.loaded) if delta else first

    def rebase(self, by: int) -> None:
        """Move every position back by `by` (window keys rotated once; sinks follow in place_sinks)."""
        self.offset += by
        for layer in self.cache.layers:
            layer.keys[:, :, self.sink:] = shift_keys(layer.keys[:, :, self.sink:], -by, self.loaded)


def stream_nll(loaded: LoadedModel, ids: Sequence[int], policy: str, sink: int = 4, window: int = 256,
               progress: Progress | None = None) -> StreamResult:
    """Feed `ids` one token at a time under a cache policy and return each next-token NLL.

    `full` scores only the tokens within the model's context (`StreamResult.n_tokens`); the evicting policies score
    any length. progress: called as progress(policy, done, total) every 16 tokens and after the last (the task is the
    policy's name: "full", "sink_window", "window")."""
    if policy not in POLICIES:
        raise SinkscopeError(f"unknown cache policy '{policy}': use one of {', '.join(POLICIES)}")
    if sink < 0 or window < 1:
        raise SinkscopeError("--sink must be ≥ 0 and --window ≥ 1")
    if len(ids) < 2:
        raise SinkscopeError("the text is too short: it needs at least two tokens")
    context = context_length(loaded)
    budget = sink + window
    if policy != "full":
        _rotary(loaded)
        if context is not None and context < budget + 2:
            raise SinkscopeError(f"the cache budget sink + window = {budget} does not fit the model's context of "
                                 f"{context} tokens: pass a smaller --window")
    elif context is not None:
        ids = list(ids)[:context]
    model = loaded.model
    keep = sink if policy == "sink_window" else 0
    cache = DynamicCache(config=model.config)
    book = _SinkWindowCache(loaded, cache, keep, budget)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = torch.tensor(list(ids), device=loaded.device)
    nll = torch.empty(len(ids) - 1)
    total = len(ids) - 1
    with torch.inference_mode():
        for t in range(total):
            if policy != "full":
                if context is not None and t - book.offset >= context:
                    book.rebase(t - book.offset - budget)
                if t >= budget:
                    book.place_sinks(t)
            pos = torch.tensor([[t - book.offset]], device=tokens.device)
            out = model(input_ids=tokens[t : t + 1][None], position_ids=pos, use_cache=True, **{cache_arg: cache})
            logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            nll[t] = -logp[tokens[t + 1]].cpu()
            if policy != "full" and cache.get_seq_length() > budget:
                book.evict()
            if progress is not None and ((t + 1) % 16 == 0 or t + 1 == total):
                progress(policy, t + 1, total)
    return StreamResult(policy=policy, sink=sink, window=window, nll=nll)


def compare(loaded: LoadedModel, ids: Sequence[int], sink: int = 4, window: int = 256,
            policies: Sequence[str] = POLICIES, progress: Progress | None = None
            ) -> list[StreamResult]:
    """Run every policy on the same tokens. `progress(policy, done, total)` as in `stream_nll`."""
    return [stream_nll(loaded, ids, p, sink, window, progress) for p in policies]
