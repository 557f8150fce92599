"""Capture attention statistics inside the forward pass, without materialising every layer's n×n maps.

sinkscope registers an attention function named ``"sinkscope"`` in transformers' `AttentionInterface`. While a
capture session is active, each attention layer (1) computes its output exactly as the model's native backend
would (SDPA, or the model's own eager function where SDPA cannot express it: logit soft-capping, learned sink
logits) and (2) recomputes softmax(QKᵀ·scale + mask) in query chunks, in float32, to accumulate statistics.
Extra memory is O(chunk × n) per head; only what the caller asks for (`CaptureConfig`) is kept.

Learned sink logits (rows sum to 1 − sink share) come from the attention call's `s_aux` argument (gpt-oss), or, for
a module whose call passes none, from the module itself: `module.sinkscope_sink_logits` (`SINK_LOGITS_ATTR`) is a
tensor [heads] or the name of the module's parameter or buffer that holds them (see `module_sink_logits`).
"""

from __future__ import annotations

import contextvars
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sinkscope.capture.moments import candidate_values, tag_moments
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel

ATTN_NAME = "sinkscope"
SINK_LOGITS_ATTR = "sinkscope_sink_logits"


class ProbsHook(Protocol):
    """An intervention: changes a layer's attention probabilities inside the forward pass. It receives whole rows
    [b, h, c, k] — a chunk of the layer's queries, or all of them — and keeps invisible keys (−inf bias) at zero."""

    def applies(self, layer: int | None) -> bool: ...

    def __call__(self, probs: torch.Tensor, layer: int | None, bias: torch.Tensor) -> torch.Tensor: ...


_HOOKS: contextvars.ContextVar[tuple[ProbsHook, ...]] = contextvars.ContextVar("sinkscope_hooks", default=())


@dataclass
class CaptureConfig:
    """What to collect. Everything not asked for is never stored.

    rows: query positions whose full attention rows are kept: "last" (the last real token of each prompt),
        a list of positions (negative counts from the end of each prompt), or None.
    entropy: per-query entropy of each head's attention row.
    maps: full [query, key] maps — only for prompts up to `max_map_tokens` tokens.
    head_outputs: per-head outputs o_i = Σ_j A_ij v_j (before the output projection).
    head_output_norms: only ‖o_i‖ per head and query (`Trace.head_output_norms`), at 1/d_v of the memory.
    values: per-KV-head value vectors v_j.
    value_norms: only ‖v_j‖ per KV head and key (`Trace.value_norms`).
    columns: key positions (prompt coordinates; negative counts from the end of each prompt) whose attention columns
        A[:, k] are kept for every query — e.g. [0] for the attention each query pays to the first token.
    sink_columns: a floor ε: per head, keep the columns of the keys whose column mass α_k exceeds ε (the candidate
        sinks, for the tag decomposition). `columns` and `sink_columns` are computed from the chunks' row maxima and
        normalisers after the key mass is known — never as a [query, key] matrix — and exclude each other.
    column_values: with `columns` or `sink_columns`, also the value vectors of the kept keys, per head
        (`Trace.column_values`): what a column contributes to a head's output, A_ik v_k, without every value.
    tag_moments: reduce the head outputs and the kept columns of each layer to the moments of the tag / non-tag
        split (`sinkscope.capture.moments`: O(d_v² + K·d_v) per head, `Trace.tag_moments`) instead of storing them;
        needs `columns` or `sink_columns`. The columns are then not kept (ask for `head_outputs` to keep those).
    hidden: residual-stream sites to record ("embed", "attn", "block"; see `sinkscope.capture.hidden`), or None.
    hidden_norms: record only the L2 norm ‖h‖ of each site's vector per position (`Trace.hidden_norms`) instead of
        the vectors — what norm profiles need, at 1/d of the memory.
    hidden_top: k > 0 also reduces each site, per prompt, to its k largest |h| entries with position and dimension,
        the median |h| and the first token's vector (`Trace.hidden_summary`; `capture.hidden.hidden_summary`).
    hidden_leading: J > 0 also sums h_j / ‖h_j‖ over the prompts at each site and position j < J
        (`Trace.hidden_units`, `Trace.hidden_unit_count`): the cross-prompt cosine without keeping the vectors.
    logprobs: keep log p(next token) at each prompt's last real token (a causal LM head is needed).
    loss: per prompt, Σ −log p(x_{t+1} | x_≤t) over the positions t where x_t and x_{t+1} are real tokens
        (`Trace.nll_sum`, nats) and the number of those positions (`Trace.nll_count`). The LM head then runs at
        every position: [batch, n, vocab] logits per batch.
    chunk_size: queries per chunk in the recomputation (None: adaptive, see `chunk_size_for`).
    fused: compute the layer output A·V from the same float32 chunks as the statistics (the default: one attention
        computation per layer); outputs then equal SDPA's up to float32 rounding (≈1e-6), not bit for bit. False:
        the output comes from the native kernel (SDPA / the model's eager function) as well, exactly as without
        sinkscope, at the cost of a second attention pass. Under interventions (`intervene`) the output always comes
        from the changed chunks.
    """

    rows: str | Sequence[int] | None = "last"
    entropy: bool = True
    maps: bool = False
    max_map_tokens: int = 512
    head_outputs: bool = False
    head_output_norms: bool = False
    values: bool = False
    value_norms: bool = False
    columns: Sequence[int] | None = None
    sink_columns: float | None = None
    column_values: bool = False
    tag_moments: bool = False
    hidden: Sequence[str] | None = None
    hidden_norms: bool = False
    hidden_top: int = 0
    hidden_leading: int = 0
    logprobs: bool = False
    loss: bool = False
    chunk_size: int | None = None
    fused: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rows, str) and self.rows != "last":
            raise SinkscopeError(f"rows must be 'last', a list of positions or None, not '{self.rows}'")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise SinkscopeError("chunk_size must be a positive number of queries")
        if self.columns is not None and self.sink_columns is not None:
            raise SinkscopeError("ask for fixed `columns` or for `sink_columns`, not both")
        if self.sink_columns is not None and not 0 < self.sink_columns < 1:
            raise SinkscopeError(f"the sink-column floor must be in (0, 1), got {self.sink_columns}")
        if (self.tag_moments or self.column_values) and self.columns is None and self.sink_columns is None:
            raise SinkscopeError("tag_moments and column_values need columns: set `sink_columns` or `columns`")
        if (self.hidden_top or self.hidden_leading) and self.hidden is None:
            raise SinkscopeError("hidden_top and hidden_leading reduce residual-stream sites: set `hidden` too")
        if self.hidden_top < 0 or self.hidden_leading < 0:
            raise SinkscopeError("hidden_top and hidden_leading must be ≥ 0")
        if self.hidden is not None:
            unknown = set(self.hidden) - {"embed", "attn", "block"}
            if unknown:
                raise SinkscopeError(f"unknown hidden-state sites {sorted(unknown)}: use embed, attn, block")


@dataclass
class LayerRecord:
    """Statistics of one attention call (one layer) for one batch, in the batch's padded coordinates."""

    key_mass_sum: torch.Tensor  # [batch, head, key]  Σ over valid queries that see key k of A_ik
    key_count: torch.Tensor  # [batch, key]  number of valid queries that see key k
    rows: torch.Tensor | None  # [batch, head, sel, key]
    entropy: torch.Tensor | None  # [batch, head, query]
    sink_share: torch.Tensor | None  # [batch, head, query]  1 − row sum (learned sink logits)
    maps: torch.Tensor | None  # [batch, head, query, key]
    head_outputs: torch.Tensor | None  # [batch, head, query, d_v]
    values: torch.Tensor | None  # [batch, kv_head, key, d_v]
    head_output_norms: torch.Tensor | None = None  # [batch, head, query]
    value_norms: torch.Tensor | None = None  # [batch, kv_head, key]
    column_values: torch.Tensor | None = None  # [batch, head, K, d_v]  v of each kept column's key
    column_index: torch.Tensor | None = None  # [batch, head, K] key of each kept column (padded coordinates, −1: none)
    columns: torch.Tensor | None = None  # [batch, head, query, K]  A_ik for the kept keys k
    tag_moments: dict[str, torch.Tensor] | None = None  # name → [batch, head, ...] (capture.moments)


@dataclass
class _Session:
    config: CaptureConfig
    query_valid: torch.Tensor  # [batch, n] bool, padded positions False
    row_positions: torch.Tensor | None  # [batch, sel] long, in padded coordinates
    column_positions: torch.Tensor | None = None  # [batch, C] long, in padded coordinates
    records: list[LayerRecord] = field(default_factory=list)
    workspace: _Workspace = field(default_factory=lambda: _Workspace())


class _Workspace:
    """Flat float32 buffers reused by every chunk of every layer of a session. Chunks grow along the causal triangle;
    allocating each chunk's scores anew fragments the CPU heap (peak RSS grew by a third at 2,048 tokens) and
    page-faults on every chunk."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._cached: dict[tuple[Any, ...], torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """A contiguous float32 tensor of `shape` backed by the buffer `name` (grown when too small)."""
        numel = math.prod(shape)
        buf = self._buffers.get((name, device))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, device=device)
            self._buffers[(name, device)] = buf
        return buf[:numel].view(*shape)

    def cached(self, key: tuple[Any, ...], build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor stored under `key`, built by `build` the first time (for tensors every chunk of a size shares)."""
        if key not in self._cached:
            self._cached[key] = build()
        return self._cached[key]


_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("sinkscope_session", default=None)


# ---------------------------------------------------------------------------------------------------------------
# The registered attention function
# ---------------------------------------------------------------------------------------------------------------


def sinkscope_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, head, q, d]
    key: torch.Tensor,  # [batch, kv_head, k, d]
    value: torch.Tensor,  # [batch, kv_head, k, d_v]
    attention_mask: torch.Tensor | None,  # [batch, 1, q, k] bool or additive float, or None
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Native attention output, plus statistics when a capture session is active, and the active interventions'
    changes to the attention probabilities. Returns ([b, q, h, d_v], None)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    position_bias = kwargs.get("position_bias")
    softcap, s_aux = kwargs.get("softcap"), kwargs.get("s_aux")
    if s_aux is None:
        s_aux = module_sink_logits(module)
    layer = getattr(module, "layer_idx", None)
    hooks = [hook for hook in _HOOKS.get() if hook.applies(layer)]
    head_scale = _head_scale(hooks, layer, query.shape[1], query.device)
    if head_scale is not None:  # per-head scaling (ablation) rides the chunked path: no [q, k] matrix
        hooks = []
    session = _ACTIVE.get()
    if hooks and session is None and query.shape[2] > 1:  # a prompt under interventions: A a chunk at a time
        from sinkscope.capture.intervene import chunked_attention

        output = chunked_attention(hooks, layer, query, key, value, attention_mask, is_causal, scaling, softcap, s_aux,
                                   position_bias)
        return output.to(query.dtype), None
    if hooks and session is None:  # a decode step under interventions: one query, [b, h, 1, k]
        bias = additive_bias(attention_mask, query, key, is_causal, position_bias)
        probs = attention_probs(query, key, bias, scaling, softcap, s_aux)
        for hook in hooks:
            probs = hook(probs, layer, bias)
        return _weighted_values(probs, value).to(query.dtype), None
    if session is not None and (session.config.fused or hooks):  # the hooks change each chunk: output from them
        record, fused = _statistics(session, query, key, value, attention_mask, is_causal, scaling, softcap, s_aux,
                                    position_bias, want_output=True, head_scale=head_scale, hooks=hooks, layer=layer)
        session.records.append(record)
        assert fused is not None
        return fused.to(query.dtype), None
    output = _native_output(module, query, key, value, attention_mask, is_causal, scaling, dropout, s_aux, kwargs)
    if head_scale is not None:
        output = output * head_scale.to(output.dtype)[None, None, :, None]
    if session is not None:
        record, _ = _statistics(session, query, key, value, attention_mask, is_causal, scaling, softcap, s_aux,
                                position_bias, head_scale=head_scale)
        session.records.append(record)
    return output, None


def module_sink_logits(module: torch.nn.Module) -> torch.Tensor | None:
    """The learned sink logits [h] an attention module declares for itself, or None: `module.sinkscope_sink_logits`
    is a tensor [h] (e.g. a non-persistent zeros buffer for softmax₁, "off by one") or the name of the module's
    parameter or buffer that holds them (e.g. "sinks"). A name, not a callable or a second reference to the parameter,
    so that copies, `.to()` and `state_dict` see the parameter once. An `s_aux` argument of the call wins over it."""
    found = getattr(module, SINK_LOGITS_ATTR, None)
    if isinstance(found, str):
        found = getattr(module, found, None)
    if found is not None and not isinstance(found, torch.Tensor):
        raise SinkscopeError(f"{type(module).__name__}.{SINK_LOGITS_ATTR} must be a tensor [heads] or the name of "
                             "the module's parameter that holds its sink logits")
    return found


def _head_scale(hooks: Sequence[ProbsHook], layer: int | None, n_heads: int, device: torch.device
                ) -> torch.Tensor | None:
    """[h] product of the hooks' per-head factors when every active hook only scales whole heads (A_h ← c_h·A_h,
    e.g. head ablation), else None (the hooks need the probabilities)."""
    if not hooks:
        return None
    scale = torch.ones(n_heads, device=device)
    for hook in hooks:
        factor = getattr(hook, "head_scale", None)
        got = factor(layer, n_heads) if callable(factor) else None
        if got is None:
            return None
        scale = scale * got.to(device)
    return scale


def attention_probs(
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d]
    bias: torch.Tensor,  # [b|1, 1|h, q, k]
    scaling: float,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,  # [h]
) -> torch.Tensor:
    """softmax(QKᵀ·scale [soft-capped] + bias) in float32, with GQA and learned sink logits (their column dropped,
    so rows sum to 1 − sink share). Fully masked rows are zeros. Returns [b, h, q, k]."""
    b, h, nq, d = query.shape
    kvh, nk = key.shape[1], key.shape[2]
    scores = (query.float().view(b, kvh, h // kvh, nq, d) @ key.float().transpose(-1, -2)[:, :, None])
    scores = scores.view(b, h, nq, nk).mul_(scaling)  # in place: fresh [b, h, q, k] buffers cost page faults
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores.add_(bias)
    if s_aux is not None:
        sink = s_aux.float().reshape(1, h, 1, 1).expand(b, h, nq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0) if probs.requires_grad else probs.nan_to_num_(nan=0.0)


def _weighted_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """o_i = Σ_j A_ij v_j per head, with GQA. probs [b, h, q, k], value [b, kvh, k, dv] → [b, q, h, dv]."""
    b, h, nq, nk = probs.shape
    kvh = value.shape[1]
    out = probs.view(b, kvh, h // kvh, nq, nk) @ value.float()[:, :, None]
    return out.reshape(b, h, nq, -1).transpose(1, 2).contiguous()


def _native_output(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    dropout: float,
    s_aux: torch.Tensor | None,  # [h]
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """What the model would compute without sinkscope: SDPA, or the model's eager function for soft-capping and
    learned sink logits (which SDPA does not support). Sink logits the module declares itself (`module_sink_logits`)
    have no kernel sinkscope knows: softmax with the sink, in float32, times V."""
    if s_aux is not None and kwargs.get("s_aux") is None:
        bias = additive_bias(attention_mask, query, key, is_causal, kwargs.get("position_bias"))
        probs = attention_probs(query, key, bias, scaling, kwargs.get("softcap"), s_aux)  # [b, h, q, k]
        return _weighted_values(probs, value).to(query.dtype)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise SinkscopeError(
                f"{type(module).__name__} uses soft-capping or sink logits but its module has no eager attention "
                "function; sinkscope cannot reproduce its output"
            )
        bias = additive_bias(attention_mask, query, key, is_causal, kwargs.get("position_bias"))
        mask = bias.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        out, _ = eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        return out
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return out


def additive_bias(
    mask: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    is_causal: bool,
    position_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The mask as a float32 additive bias with -inf at invisible keys (with no mask and `is_causal`, query i sees the
    keys up to i + k − q: the cache holds k − q earlier keys). Returns [batch|1, 1|head, q, k]."""
    nq, nk = query.shape[2], key.shape[2]
    if mask is None:
        visible = torch.ones(nq, nk, dtype=torch.bool, device=query.device)
        if is_causal and nq > 1:
            offset = nk - nq
            visible = torch.arange(nq, device=query.device)[:, None] + offset >= torch.arange(nk, device=query.device)
        bias = torch.zeros(1, 1, nq, nk, device=query.device).masked_fill(~visible, -math.inf)
    elif mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)
    else:
        bias = mask.float()
        bias = bias.masked_fill(bias <= torch.finfo(mask.dtype).min / 2, -math.inf)
    bias = bias[..., -nk:]
    if position_bias is not None:
        bias = bias + position_bias.float()
    return bias


_CPU_CHUNK_BYTES = 1 * 2**20  # float32 scores per chunk on CPU: about one core's L2 cache
_CPU_BATCH_BYTES = 4 * 2**20  # short prompts batched into one chunk up to this (fewer, larger ops: see pass_sizes)
_GPU_CHUNK_BYTES = 512 * 2**20  # on accelerators fewer, larger kernels win
_MIN_ROWS = 192  # rows of a KV head's scores per chunk, its query heads × queries (see min_chunk)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: the driver's count; CPU: MemAvailable), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def min_chunk(group: int) -> int:
    """The fewest queries worth a chunk when `group` query heads share each KV head: `_MIN_ROWS` rows per KV head.
    Each chunk's matmuls pack its KV head's keys and values anew, and with fewer rows packing outweighs multiplying
    (queries · keys at 2,048 keys, one thread: 44 GFLOP/s with 64 rows, 67 with 128, 76 with 256). More rows also
    mean a larger masked triangle per causal chunk: at 4,096 tokens 192 rows beat 128 and 256 (bench/RESULTS.md)."""
    return max(1, math.ceil(_MIN_ROWS / max(1, group)))


def chunk_size_for(batch: int, heads: int, nk: int, device: torch.device, requested: int | None = None,
                   group: int = 1) -> int:
    """Queries per chunk: `requested`, or as many as keep one chunk's float32 scores [b, h, c, nk] near the device's
    target size, but at least `min_chunk(group)` (`group` query heads per KV head) and always below 1/16 of free
    memory (a chunk holds about four such tensors at once)."""
    if requested is not None:
        return requested
    row = max(1, batch * heads * nk * 4)
    target = _CPU_CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES
    chunk = max(min_chunk(group), target // row)
    free = free_memory(device)
    if free is not None:
        chunk = min(chunk, free // 16 // row)
    return max(1, min(4096, chunk))


_NEG = -1e30  # finite "minus infinity": exp underflows to 0 and 0 · _NEG stays finite, so no NaN fix-ups
_LOG2E = 1.0 / math.log(2.0)  # scores in base 2: exp(s) = exp2(s · log₂e)
_LN2 = math.log(2.0)


def _chunk_visibility(
    mask: torch.Tensor | None,  # [b, 1, q, k] bool or additive float, or None
    c0: int,
    c1: int,
    nq: int,
    nk: int,
    is_causal: bool,
    device: torch.device,
    need_visible: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Which keys the queries c0..c1 see, without building the n×n mask.

    Returns (bias [b|1, 1, c, kend] float32 with _NEG at invisible keys, or None when every key < kend is visible
    except a causal triangle handled by the caller; visible [b|1, c, kend] bool, or None for that causal triangle
    unless `need_visible`; kend: one past the last key any query of the chunk sees — keys past it get no attention
    and are skipped)."""
    c = c1 - c0
    if mask is None:  # SDPA's semantics: is_causal is top-left aligned (query i sees keys ≤ i); one query sees all
        if not (is_causal and nq > 1):
            return None, torch.ones(1, c, nk, dtype=torch.bool, device=device), nk
        kend = min(c1, nk)
        if not need_visible:
            return None, None, kend
        return None, _causal_visible(c0, c1, 0, kend, device)[None], kend
    chunk = mask[:, :, c0:c1, -nk:]
    visible = chunk[:, 0] if chunk.dtype == torch.bool else chunk[:, 0] > torch.finfo(chunk.dtype).min / 2
    hit = visible.any(0).any(0).nonzero()
    kend = int(hit[-1]) + 1 if hit.numel() else 1
    visible = visible[..., :kend]
    if chunk.dtype == torch.bool:
        bias = torch.zeros(visible.shape, device=device).masked_fill_(~visible, _NEG)[:, None]
    else:
        bias = chunk[..., :kend].float().masked_fill(~visible[:, None], _NEG)
    return bias, visible, kend


def _chunk_probs(
    query: torch.Tensor,  # [b, h, c, d] (one chunk of queries)
    key: torch.Tensor,  # [b, kvh, kend, d]
    bias: torch.Tensor | None,  # [b|1, 1|h, c, kend] or None (causal triangle at the end)
    visible: torch.Tensor | None,  # [b|1, c, kend] (read only with a bias)
    tail: torch.Tensor | None,  # [c, w] the causal triangle's bias over the last w keys (None: no triangle)
    scaling: float,
    softcap: float | None,
    s_aux: torch.Tensor | None,  # [h]
    want_entropy: bool,
    workspace: _Workspace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Unnormalised attention e = exp(s − max) of a chunk and its row normaliser, in float32.

    Returns (e [b, h, c, kend], rz [b, h, c, 1] = 1/Z (0 for rows that see no key), max [b, h, c, 1], entropy
    [b, h, c] or None, sink share [b, h, c] or None). A = e · rz; with learned sink logits Z includes the sink's exp,
    so rows sum to 1 − sink share. The entropy uses H = log Z · Σ_j A_j − rz · Σ_j e_j (s_j − max) — no log of the
    n×c matrix.

    The scores are taken in base 2 (s·log₂e, folded into the queries' scaling) and exponentiated with exp2: the same
    e and the same rounding, but on CPU torch's float32 exp2 is vectorised and its exp is not (0.38 against 1.21 ns
    per element here) — exp was a fifth of a long prompt's chunk time."""
    b, h, c, d = query.shape
    kvh, kend = key.shape[1], key.shape[2]
    g = h // kvh
    base = scaling if softcap is not None else scaling * _LOG2E  # soft-capping acts on the natural scores
    q = query.float().mul(base).view(b, kvh, g, c, d).reshape(b * kvh, g * c, d)
    kt = key.float().reshape(b * kvh, kend, d).transpose(1, 2)
    # Under autograd (interventions in a forward pass that keeps gradients) no reused buffers and no in-place change
    # of a tensor autograd keeps; the numbers are the same.
    tracked = torch.is_grad_enabled() and (q.requires_grad or kt.requires_grad)
    if tracked:
        s = torch.bmm(q, kt)
    else:
        s = torch.bmm(q, kt, out=workspace.take("scores", (b * kvh, g * c, kend), query.device))
    s = s.view(b, h, c, kend)  # [b, h, c, kend] in base 2
    if softcap is not None:
        s = torch.tanh(s / softcap) * (softcap * _LOG2E) if tracked else s.div_(softcap).tanh_().mul_(softcap * _LOG2E)
    # Invisible keys get ≈ −1e30, which exp2 turns into exact zeros at full speed (measured; exp's vector lanes take a
    # slow path 6× as long under −88, and exp2's under −126 down to at least −200), so no masked refills are needed.
    if bias is not None:
        s = s.add(bias, alpha=_LOG2E) if tracked else s.add_(bias, alpha=_LOG2E)
    elif tail is not None:  # every key before the last w is visible to the whole chunk
        s[..., kend - tail.shape[1]:] += tail
    m = s.detach().amax(-1, keepdim=True)  # [b, h, c, 1] (softmax does not depend on it: no gradient needed)
    if s_aux is not None:
        sink = s_aux.float().view(1, h, 1, 1) * _LOG2E
        m = torch.maximum(m, sink)
    s -= m
    # the entropy reads s beside e = exp2(s); without it e overwrites s (one chunk buffer, not two)
    if tracked:
        e = torch.exp2(s)
    else:
        e = torch.exp2(s, out=workspace.take("exp", (b, h, c, kend), query.device)) if want_entropy else s.exp2_()
    z = e.sum(-1, keepdim=True)
    sink_e = torch.exp2(sink - m) if s_aux is not None else None
    if sink_e is not None:
        z = z + sink_e
    # without a bias every row sees key 0 (causal or not); with one, rows that see nothing get zeros: sees
    # [b|1, 1, c, 1], or None when every row sees a key
    sees = visible.any(-1)[:, None, :, None].float() if bias is not None and visible is not None else None
    rz = z.reciprocal() if sees is None else z.reciprocal() * sees
    entropy = share = None
    if want_entropy or sink_e is not None:
        row_sum = rz * (z - sink_e) if sink_e is not None else (rz > 0).float()
        if want_entropy:
            et = torch.einsum("bhck,bhck->bhc", e, s)[..., None] * _LN2  # Σ_j e_j (s_j − max), natural units
            entropy = (torch.log(z) * row_sum - rz * et).squeeze(-1)
        if sink_e is not None:
            share = (1.0 - row_sum if sees is None else (1.0 - row_sum) * sees).squeeze(-1)
    return e, rz, m * _LN2, entropy, share


@dataclass
class _Sums:
    """What `_statistics` accumulates for one layer, every tensor with the batch as dim 0 (None: not asked for)."""

    key_mass_sum: torch.Tensor  # [b, h, 1, k]
    key_count: torch.Tensor | None  # [b, 1, k]  (None in a pass that does not count: see `part`)
    entropy: torch.Tensor | None  # [b, h, q]
    sink_share: torch.Tensor | None  # [b, h, q]
    rows: torch.Tensor | None  # [b, h, s, k]
    maps: torch.Tensor | None  # [b, h, q, k]
    outs: torch.Tensor | None  # [b, h, q, dv]
    layer_out: torch.Tensor | None  # [b, q, h, dv]
    row_max: torch.Tensor | None  # [b, h, q]
    row_rz: torch.Tensor | None  # [b, h, q]

    def part(self, prompts: slice, heads: slice, count: bool) -> _Sums:
        """Views of some prompts and query heads: what is written to them lands in the whole batch's tensors. The
        query counts do not depend on the head, so only one pass over each prompt (`count`) adds them."""

        def cut(name: str, x: torch.Tensor | None) -> torch.Tensor | None:
            x = _prompts(x, prompts)
            if x is None or name == "key_count":
                return x if count else None
            return x[:, :, heads] if name == "layer_out" else x[:, heads]

        return _Sums(**{f.name: cut(f.name, getattr(self, f.name)) for f in fields(self)})


def _prompts(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    """The rows `part` of a tensor whose dim 0 is the batch (a size-1 dim 0 broadcasts: returned whole)."""
    return x if x is None or x.shape[0] == 1 else x[part]


def _heads(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    """The query heads `part` of a tensor whose dim 1 is the head (a size-1 dim 1 broadcasts: returned whole)."""
    return x if x is None or x.shape[1] == 1 else x[:, part]


def pass_sizes(batch: int, heads: int, kv_heads: int, nk: int, device: torch.device) -> tuple[int, int]:
    """How many prompts and KV heads (with their query heads) `_statistics` reduces together, split evenly.

    A chunk holds at least `min_chunk` queries (or the whole prompt) of every head of the pass. When that chunk of one
    prompt and every head fits the device's target size (short prompts), whole prompts are batched, on CPU up to
    `_CPU_BATCH_BYTES`: at 128 tokens the per-op cost, not the cache, dominates. Otherwise a pass is one prompt and as
    many KV heads as keep the chunk within the target (at least one), so on CPU a chunk stays cache-sized instead of
    growing with the batch or the heads (2,048 tokens: 1.5 MB per head, not 18 MB for twelve). A head's queries read
    only its KV head's keys, so splitting heads re-reads nothing."""
    target = _CPU_CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES
    group = max(1, heads // kv_heads)
    per_head = max(1, nk * 4 * min(nk, min_chunk(group)))
    if heads * per_head <= target:
        room = _CPU_BATCH_BYTES if device.type == "cpu" else target
        fit = max(1, min(batch, room // (heads * per_head)))
        return math.ceil(batch / math.ceil(batch / fit)), kv_heads
    fit = max(1, min(kv_heads, target // (group * per_head)))
    return 1, math.ceil(kv_heads / math.ceil(kv_heads / fit))


def _chunk_attention(
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d] float32, contiguous
    mask: torch.Tensor | None,  # [b|1, 1, q, k] bool or additive float, or None
    position_bias: torch.Tensor | None,  # [b|1, h, q, k]
    c0: int,
    c1: int,
    *,
    is_causal: bool,
    scaling: float,
    softcap: float | None,
    s_aux: torch.Tensor | None,  # [h]
    want_entropy: bool,
    workspace: _Workspace,
    need_visible: bool = True,
) -> tuple[torch.Tensor | None, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
           torch.Tensor | None]:
    """The queries c0..c1: (visible [b|1, c, kend] — None for a plain causal triangle unless `need_visible` —, kend,
    then `_chunk_probs`' e [b, h, c, kend], rz, max, entropy, sink share) — the keys past kend are seen by no query of
    the chunk."""
    nq, nk = query.shape[2], key.shape[2]
    bias, visible, kend = _chunk_visibility(mask, c0, c1, nq, nk, is_causal, query.device,
                                            need_visible or position_bias is not None)
    if position_bias is not None:
        pb = position_bias[:, :, c0:c1, -nk:][..., :kend].float()
        bias = pb if bias is None else bias + pb
        if mask is None and is_causal and nq > 1:
            assert visible is not None
            bias = bias.masked_fill(~visible[:, None], _NEG)
    tail = None
    if bias is None and mask is None and is_causal and c1 - c0 > 1:
        tail = _causal_tail(c0, c1, kend, workspace, query.device)
    e, rz, m, ent, share = _chunk_probs(query[:, :, c0:c1], key[:, :, :kend], bias, visible, tail, scaling, softcap,
                                        s_aux, want_entropy, workspace)
    return visible, kend, e, rz, m, ent, share


def _causal_tail(c0: int, c1: int, kend: int, workspace: _Workspace, device: torch.device) -> torch.Tensor:
    """The causal triangle of the queries c0..c1 over their last w = min(c, kend) keys (every earlier key is seen by
    the whole chunk) as a bias [c, w] float32: _NEG at the keys a query does not see, 0 elsewhere. A chunk that ends
    at its last key has the same triangle wherever it starts: it is built once per size."""
    c = c1 - c0
    start = kend - min(c, kend)

    def build() -> torch.Tensor:
        hidden = ~_causal_visible(c0, c1, start, kend, device)
        return torch.zeros(hidden.shape, device=device).masked_fill_(hidden, _NEG)

    if start == c0 and kend - start == c:  # the same triangle wherever the chunk starts
        return workspace.cached(("causal_tail", c, device), build)
    return build()


def _causal_visible(c0: int, c1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
    """[c1 − c0, k1 − k0] bool: whether query c0 + i sees key k0 + j under a top-left causal mask (key ≤ query)."""
    return torch.arange(c0, c1, device=device)[:, None] >= torch.arange(k0, k1, device=device)


def _query_counts(qvalid: torch.Tensor, visible: torch.Tensor | None, c0: int, c1: int, kend: int, causal_only: bool
                  ) -> torch.Tensor:
    """[b|1, 1, kend]: how many real queries of c0..c1 see each key. qvalid [b, q] bool, visible [b|1, c, kend]. With no
    mask but the causal triangle of a prompt (`causal_only`: every query real, query i sees keys ≤ i) it is
    c1 − max(c0, j), without reading visible (which may then be None)."""
    if causal_only:
        keys = torch.arange(kend, device=qvalid.device).clamp(min=c0)
        return (c1 - keys).clamp(min=0).float()[None, None]
    assert visible is not None
    return qvalid[:, None, c0:c1].float() @ visible.float()


def _hook_rows(e: torch.Tensor, rz: torch.Tensor, visible: torch.Tensor, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a hook receives for a chunk: its probabilities A = e·rz over every key, [b, h, c, nk] (zeros past kend),
    and the bias [b|1, 1, c, nk] (0 where a key is visible, −inf elsewhere). e [b, h, c, kend], rz [b, h, c, 1],
    visible [b|1, c, kend]."""
    probs = e * rz
    kend = probs.shape[-1]
    if kend < nk:
        probs = F.pad(probs, (0, nk - kend))
        visible = F.pad(visible, (0, nk - kend), value=False)
    return probs, torch.zeros(visible.shape, device=probs.device).masked_fill_(~visible, -math.inf)[:, None]


def _gather_columns(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """probs [b, h, c, k], index [b, h, K] (−1: none) → [b, h, c, K] the columns A[:, k] of the index (0 at −1)."""
    b, h, c, _ = probs.shape
    got = probs.gather(-1, index.clamp(min=0)[:, :, None, :].expand(b, h, c, index.shape[-1]))
    return got * (index >= 0)[:, :, None, :]


@dataclass
class _Hooked:
    """Interventions applied to each chunk of a capture (a chunk is whole rows): the hooks in order, the layer, the
    column means of the hooks that need them (`intervene.hook_column_means`), and the fixed columns to keep (read
    from the changed chunks: index [b, h, K], accumulator [b, h, q, K])."""

    hooks: Sequence[ProbsHook]
    layer: int | None
    alphas: dict[int, torch.Tensor]
    column_index: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    def apply(self, e: torch.Tensor, rz: torch.Tensor, visible: torch.Tensor, nk: int) -> torch.Tensor:
        """A chunk's probabilities after every hook, [b, h, c, nk] (see `_hook_rows` for the arguments)."""
        from sinkscope.capture.intervene import apply_hooks

        return apply_hooks(self.hooks, self.layer, *_hook_rows(e, rz, visible, nk), self.alphas)


def _reduce_chunks(
    sums: _Sums,  # the accumulators of these prompts and heads (views)
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d]
    value: torch.Tensor,  # [b, kvh, k, dv]
    mask: torch.Tensor | None,  # [b|1, 1, q, k] bool or additive float, or None
    qvalid: torch.Tensor,  # [b, q] bool
    sel: torch.Tensor | None,  # [b, s] selected query positions
    position_bias: torch.Tensor | None,  # [b|1, h, q, k]
    *,
    is_causal: bool,
    scaling: float,
    softcap: float | None,
    s_aux: torch.Tensor | None,  # [h]
    scale: torch.Tensor | None,  # [1, h, 1, 1] per-head factor on the probabilities
    step: int,
    workspace: _Workspace,
    hooked: _Hooked | None = None,  # interventions: applied to each chunk (then all prompts and heads at once)
) -> None:
    """Recompute the attention of some prompts and heads `step` queries at a time and add each chunk to `sums`; with
    `hooked`, each chunk's probabilities are changed by the interventions first, and everything is read from the
    changed chunk (fixed columns included)."""
    b, h, nq, _ = query.shape
    kvh, nk = key.shape[1], key.shape[2]
    g = h // kvh
    dev = query.device
    all_valid = bool(qvalid.all())
    causal_only = mask is None and is_causal and nq > 1 and all_valid  # visibility is the triangle alone
    entropy, sink_share, row_max, row_rz = sums.entropy, sums.sink_share, sums.row_max, sums.row_rz
    key_mass_sum, key_count, outs, layer_out = sums.key_mass_sum, sums.key_count, sums.outs, sums.layer_out
    need_av = outs is not None or layer_out is not None
    # One float32 copy laid out [b, kvh, k, d]: a model's K and V are usually head-transposed views of [b, k, kvh, d],
    # which each chunk's reshape to [b·kvh, kend, d] would otherwise copy again.
    key = key.float().contiguous()
    if need_av:
        value = value.float().contiguous()
    for c0 in range(0, nq, step):
        c1 = min(nq, c0 + step)
        c = c1 - c0
        visible, kend, e, rz, m, ent, share = _chunk_attention(
            query, key, mask, position_bias, c0, c1, is_causal=is_causal, scaling=scaling, softcap=softcap,
            s_aux=s_aux, want_entropy=entropy is not None and hooked is None, workspace=workspace,
            need_visible=hooked is not None or not causal_only)
        if hooked is not None:  # A' = the hooks' change of A = e·rz over whole rows; then e ← A', rz ← 1
            assert visible is not None
            changed = hooked.apply(e, rz, visible, nk)  # [b, h, c, nk]
            if hooked.columns is not None and hooked.column_index is not None:
                hooked.columns[:, :, c0:c1] = _gather_columns(changed, hooked.column_index)
            e, rz, m = changed[..., :kend], torch.ones(b, h, c, 1, device=dev), None
            if entropy is not None:
                ent = -torch.special.xlogy(e, e).sum(-1)
            if s_aux is not None:
                share = (1.0 - e.sum(-1)) * visible.any(-1)[:, None]  # rows that see no key: 0, as unchanged
        if entropy is not None:
            entropy[:, :, c0:c1] = ent
        if sink_share is not None:
            sink_share[:, :, c0:c1] = share
        if scale is not None:
            rz = rz * scale
        if row_max is not None and row_rz is not None:
            row_rz[:, :, c0:c1] = rz[..., 0]
            row_max[:, :, c0:c1] = m[..., 0] if m is not None else 0.0
        weight = rz if all_valid else rz * qvalid[:, None, c0:c1, None]  # [b, h, c, 1]
        key_mass_sum[..., :kend] += weight.transpose(-1, -2) @ e
        if key_count is not None:
            key_count[..., :kend] += _query_counts(qvalid, visible, c0, c1, kend, causal_only)
        if need_av:
            av = torch.bmm(e.reshape(b * kvh, g * c, kend), value[:, :, :kend].float().reshape(b * kvh, kend, -1))
            av = av.view(b, h, c, -1) * rz  # [b, h, c, dv]
            if outs is not None:
                outs[:, :, c0:c1] = av
            if layer_out is not None:
                layer_out[:, c0:c1] = av.transpose(1, 2)
        if sums.maps is not None:
            sums.maps[:, :, c0:c1, :kend] = e * rz
        if sums.rows is not None and sel is not None:
            _gather_rows(sums.rows, e, rz, sel, c0, c1, kend)


def _statistics(
    session: _Session,
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d]
    value: torch.Tensor,  # [b, kvh, k, dv]
    mask: torch.Tensor | None,  # [b, 1, q, k] bool or additive float, or None (causal or full, by is_causal)
    is_causal: bool,
    scaling: float,
    softcap: float | None,
    s_aux: torch.Tensor | None,  # [h] learned sink logits
    position_bias: torch.Tensor | None = None,  # [b|1, h, q, k]
    want_output: bool = False,
    head_scale: torch.Tensor | None = None,  # [h] per-head factor on the probabilities (head ablation)
    hooks: Sequence[ProbsHook] = (),
    layer: int | None = None,
) -> tuple[LayerRecord, torch.Tensor | None]:
    """Recompute the attention chunk by chunk in float32 and reduce it to the requested statistics; with
    `want_output`, also the layer's attention output A·V [b, q, h, dv] (float32) from the same chunks.

    Per query chunk only the keys some query of the chunk can see are touched (for a causal mask, half the work), the
    mask is built per chunk (never n×n unless the model passed one), and the probabilities are never normalised
    as a matrix: key mass, entropy, rows and A·V are all reductions of e = exp(s − max) scaled by 1/Z per row.

    With `hooks` (interventions, applied in order) each chunk's probabilities are changed before they are reduced, so
    every statistic and the output are those of the changed attention, still without a [b, h, q, k] tensor. A hook
    that needs column means (ACT) gets them from a pass over the chunks first (`intervene.hook_column_means`, as
    without a capture); `sink_columns` under hooks take one more pass (the candidates follow from the key mass)."""
    cfg = session.config
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    dev = query.device
    qvalid = session.query_valid[:, -nq:].to(dev)  # [b, q]
    want_maps = cfg.maps and nk <= cfg.max_map_tokens
    sel = session.row_positions.to(dev) - (session.query_valid.shape[1] - nq) \
        if session.row_positions is not None else None  # [b, s]

    reads_o = cfg.tag_moments or cfg.head_output_norms  # these read o from the fused output when there is one
    need_outs = cfg.head_outputs or (reads_o and not want_output)
    want_columns = cfg.columns is not None or cfg.sink_columns is not None
    dv = value.shape[-1]
    sums = _Sums(
        key_mass_sum=torch.zeros(b, h, 1, nk, device=dev),
        key_count=torch.zeros(b, 1, nk, device=dev),
        entropy=torch.zeros(b, h, nq, device=dev) if cfg.entropy else None,
        sink_share=torch.zeros(b, h, nq, device=dev) if s_aux is not None else None,
        rows=torch.zeros(b, h, sel.shape[1], nk, device=dev) if sel is not None else None,
        maps=torch.zeros(b, h, nq, nk, device=dev) if want_maps else None,
        outs=torch.zeros(b, h, nq, dv, device=dev) if need_outs else None,
        layer_out=torch.zeros(b, nq, h, dv, device=dev) if want_output else None,
        row_max=torch.zeros(b, h, nq, device=dev) if want_columns else None,  # per query: max score and 1/Z, so any
        row_rz=torch.zeros(b, h, nq, device=dev) if want_columns else None,  # A_ik is exp(s_ik − max)/Z afterwards
    )
    scale = head_scale.view(1, h, 1, 1).to(dev) if head_scale is not None else None
    # one query (a decode step) is one chunk whatever the memory: no probe of free memory per layer and token
    kvh = key.shape[1]
    g = h // kvh
    # hooks see every prompt and head at once: a hook's scope (heads, MaskKeyPerRow's prompts) indexes the batch's
    n_prompts, n_kv = (b, kvh) if nq == 1 or hooks else pass_sizes(b, h, kvh, nk, dev)
    step = 1 if nq == 1 else chunk_size_for(n_prompts, n_kv * g, nk, dev, cfg.chunk_size, group=g)
    hooked = None
    if hooks:
        hooked = _hooked(hooks, layer, query, key, mask, position_bias, is_causal=is_causal, scaling=scaling,
                         softcap=softcap, s_aux=s_aux, step=step, workspace=session.workspace)
        if want_columns:  # no row maxima to recompute columns from: they are read from the changed chunks
            sums.row_max = sums.row_rz = None
            if cfg.columns is not None:
                at = session.column_positions.to(dev) - (session.query_valid.shape[1] - nk)  # [b, C]
                hooked.column_index = at[:, None, :].expand(b, h, at.shape[1]).clone()
                hooked.columns = torch.zeros(b, h, nq, at.shape[1], device=dev)
    for b0 in range(0, b, n_prompts):
        prompts = slice(b0, min(b, b0 + n_prompts))
        for k0 in range(0, kvh, n_kv):
            kv, heads = slice(k0, min(kvh, k0 + n_kv)), slice(k0 * g, min(kvh, k0 + n_kv) * g)
            _reduce_chunks(sums.part(prompts, heads, count=k0 == 0), query[prompts, heads], key[prompts, kv],
                           value[prompts, kv], _prompts(mask, prompts), qvalid[prompts],
                           None if sel is None else sel[prompts], _heads(_prompts(position_bias, prompts), heads),
                           is_causal=is_causal, scaling=scaling, softcap=softcap,
                           s_aux=None if s_aux is None else s_aux[heads],
                           scale=None if scale is None else scale[:, heads], step=step,
                           workspace=session.workspace, hooked=hooked)
    key_mass_sum, key_count, row_max, row_rz = sums.key_mass_sum, sums.key_count, sums.row_max, sums.row_rz
    assert key_count is not None
    outs, layer_out = sums.outs, sums.layer_out
    column_index = columns = None
    if want_columns and hooked is not None:
        if hooked.column_index is None:  # sink columns: one more pass over the changed chunks
            alpha = key_mass_sum[:, :, 0] / key_count.clamp(min=1)  # [b, h, k]
            assert cfg.sink_columns is not None
            hooked.column_index = _sink_candidates(alpha, key_count[:, 0] > 0, cfg.sink_columns)
            hooked.columns = _hooked_columns(hooked, query, key, mask, position_bias, is_causal=is_causal,
                                             scaling=scaling, softcap=softcap, s_aux=s_aux, step=step,
                                             workspace=session.workspace)
        column_index, columns = hooked.column_index, hooked.columns * qvalid[:, None, :, None]
    elif want_columns:
        if cfg.sink_columns is not None:
            alpha = key_mass_sum[:, :, 0] / key_count.clamp(min=1)  # [b, h, k]
            column_index = _sink_candidates(alpha, key_count[:, 0] > 0, cfg.sink_columns)
        else:
            at = session.column_positions.to(dev) - (session.query_valid.shape[1] - nk)  # [b, C]
            column_index = at[:, None, :].expand(b, h, at.shape[1]).clone()
        columns = _columns_at(query, key, column_index, row_max, row_rz, mask, is_causal, scaling, softcap,
                              position_bias) * qvalid[:, None, :, None]
    moments = column_values = out_norms = None
    if cfg.tag_moments or cfg.head_output_norms:
        o = outs if outs is not None else layer_out.transpose(1, 2)  # type: ignore[union-attr]  # [b, h, q, dv]
        if cfg.head_output_norms:
            out_norms = torch.linalg.vector_norm(o, dim=-1) * qvalid[:, None, :]  # [b, h, q]
        if cfg.tag_moments:
            assert columns is not None and column_index is not None
            moments = tag_moments(o, columns, candidate_values(value, column_index),
                                  qvalid[:, None, :].expand(b, h, nq))
            columns = None
        outs = outs if cfg.head_outputs else None
    if cfg.column_values:
        assert column_index is not None
        column_values = candidate_values(value, column_index)  # [b, h, K, dv]
    record = LayerRecord(
        key_mass_sum=key_mass_sum[:, :, 0],
        key_count=key_count[:, 0],
        rows=sums.rows,
        entropy=sums.entropy,
        sink_share=sums.sink_share,
        maps=sums.maps,
        head_outputs=outs,
        values=value.float().clone() if cfg.values else None,
        column_index=column_index,
        columns=columns,
        tag_moments=moments,
        head_output_norms=out_norms,
        value_norms=torch.linalg.vector_norm(value.float(), dim=-1) if cfg.value_norms else None,
        column_values=column_values,
    )
    return record, layer_out


def _hooked(
    hooks: Sequence[ProbsHook],
    layer: int | None,
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d]
    mask: torch.Tensor | None,  # [b|1, 1, q, k] bool or additive float, or None
    position_bias: torch.Tensor | None,  # [b|1, h, q, k]
    step: int,
    **chunking: Any,  # is_causal, scaling, softcap, s_aux, workspace (`_chunk_attention`)
) -> _Hooked:
    """The hooks of a layer with their column means: for a prompt (more than one query), a pass over the chunks per
    hook that needs them (`intervene.hook_column_means`, the logic `chunked_attention` uses); a decode step's
    hooks use what they found on the prompt."""
    from sinkscope.capture.intervene import hook_column_means, real_queries

    b, nq, nk = query.shape[0], query.shape[2], key.shape[2]
    alphas: dict[int, torch.Tensor] = {}
    if nq > 1 and any(getattr(hook, "needs_columns", False) for hook in hooks):
        keys = key.float().contiguous()
        alphas = hook_column_means(hooks, layer,
                                   lambda: _hook_chunks(query, keys, mask, position_bias, step, **chunking),
                                   real_queries(mask, b, nq, nk, query.device))
    return _Hooked(hooks=hooks, layer=layer, alphas=alphas)


def _hook_chunks(
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d] float32, contiguous
    mask: torch.Tensor | None,  # [b|1, 1, q, k] bool or additive float, or None
    position_bias: torch.Tensor | None,  # [b|1, h, q, k]
    step: int,
    **chunking: Any,  # is_causal, scaling, softcap, s_aux, workspace (`_chunk_attention`)
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The unchanged attention `step` queries at a time, as hooks receive it: (c0, probs [b, h, c, k], bias
    [b|1, 1, c, k]) per chunk (`_hook_rows`)."""
    nq, nk = query.shape[2], key.shape[2]
    for c0 in range(0, nq, step):
        visible, _, e, rz, *_ = _chunk_attention(query, key, mask, position_bias, c0, min(nq, c0 + step),
                                                 want_entropy=False, **chunking)
        assert visible is not None
        yield c0, *_hook_rows(e, rz, visible, nk)


def _hooked_columns(
    hooked: _Hooked,
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d]
    mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    step: int,
    **chunking: Any,  # is_causal, scaling, softcap, s_aux, workspace (`_chunk_attention`)
) -> torch.Tensor:
    """[b, h, q, K] the changed attention's columns at `hooked.column_index` [b, h, K], a chunk at a time."""
    from sinkscope.capture.intervene import apply_hooks

    assert hooked.column_index is not None
    b, h, nq, _ = query.shape
    out = torch.zeros(b, h, nq, hooked.column_index.shape[-1], device=query.device)
    for c0, probs, bias in _hook_chunks(query, key.float().contiguous(), mask, position_bias, step, **chunking):
        changed = apply_hooks(hooked.hooks, hooked.layer, probs, bias, hooked.alphas)
        out[:, :, c0 : c0 + probs.shape[2]] = _gather_columns(changed, hooked.column_index)
    return out


def _sink_candidates(alpha: torch.Tensor, real: torch.Tensor, floor: float) -> torch.Tensor:
    """Per head, the keys whose column mass exceeds `floor`, largest first. alpha [b, h, k], real [b, k] (keys some
    query sees) → index [b, h, K] with −1 where a head has fewer than K candidates (K ≥ 1: the largest count)."""
    cand = (alpha > floor) & real[:, None]
    k_max = max(1, int(cand.sum(-1).max()))
    top = torch.where(cand, alpha, -1.0).topk(min(k_max, alpha.shape[-1]), dim=-1)
    return torch.where(top.values > floor, top.indices, -1)


def _columns_at(
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d]
    index: torch.Tensor,  # [b, h, K] key positions, −1 = none
    row_max: torch.Tensor | None,  # [b, h, q] the score maximum each row was exponentiated against
    row_rz: torch.Tensor | None,  # [b, h, q] 1/Z of each row (0 for rows that see nothing; head scaling included)
    mask: torch.Tensor | None,  # [b, 1, q, k] bool or additive float, or None
    is_causal: bool,
    scaling: float,
    softcap: float | None,
    position_bias: torch.Tensor | None,  # [b|1, h, q, k]
) -> torch.Tensor:
    """A_ik for the K keys of `index`, for every query: exp(s_ik − max_i)·(1/Z_i), recomputed from K score columns —
    [b, h, q, K] float32, zero where a key is invisible or the index is −1."""
    b, h, nq, d = query.shape
    kvh, nk = key.shape[1], key.shape[2]
    idx = index.clamp(min=0)  # [b, h, K]
    n_cols = idx.shape[-1]
    assert row_max is not None and row_rz is not None
    kv_of_head = torch.arange(h, device=query.device) // (h // kvh)  # [h]
    keys = key.float()[:, kv_of_head]  # [b, h, k, d]
    picked = keys.gather(2, idx[..., None].expand(b, h, n_cols, d))  # [b, h, K, d]
    s = (query.float() * scaling) @ picked.transpose(-1, -2)  # [b, h, q, K]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if position_bias is not None:
        pb = position_bias[..., -nk:].float().expand(b, h, nq, nk)
        s = s + pb.gather(-1, idx[:, :, None, :].expand(b, h, nq, n_cols))
    if mask is None:
        if is_causal and nq > 1:
            visible = torch.arange(nq, device=query.device)[None, None, :, None] >= idx[:, :, None, :]
        else:
            visible = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=query.device)
    else:
        m = mask[:, :1, :, -nk:].expand(b, 1, nq, nk)
        m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        gathered = m.expand(b, h, nq, nk).gather(-1, idx[:, :, None, :].expand(b, h, nq, n_cols))
        visible = gathered
        if mask.dtype != torch.bool:
            s = s + mask[:, :1, :, -nk:].float().expand(b, h, nq, nk).gather(
                -1, idx[:, :, None, :].expand(b, h, nq, n_cols)).masked_fill(~gathered, 0.0)
    a = torch.exp(s - row_max[..., None]) * row_rz[..., None]
    return torch.where(visible & (index >= 0)[:, :, None, :], a, 0.0)


def _gather_rows(rows: torch.Tensor, e: torch.Tensor, rz: torch.Tensor, sel: torch.Tensor, c0: int, c1: int,
                 kend: int) -> None:
    """Copy the normalised rows of selected queries that fall in chunk [c0, c1) into rows [b, h, s, k]."""
    inside = (sel >= c0) & (sel < c1)  # [b, s]
    if not inside.any():
        return
    bi, si = inside.nonzero(as_tuple=True)
    qi = sel[bi, si] - c0
    rows[bi, :, si, :kend] = e[bi, :, qi] * rz[bi, :, qi]


def _sinkscope_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """SDPA's mask, with SDPA's own rules: None where the caller allows it and plain `is_causal` (top-left aligned)
    or no mask at all is equivalent — then each statistics chunk builds its visibility without an n×n tensor."""
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_NAME, sinkscope_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _sinkscope_mask)


# ---------------------------------------------------------------------------------------------------------------
# Sessions around a forward pass
# ---------------------------------------------------------------------------------------------------------------


def check_supported(model: transformers.PreTrainedModel) -> None:
    """Fail with a clear message if the model does not dispatch attention through the AttentionInterface."""
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is not None and not can():
        raise SinkscopeError(
            f"{type(model).__name__} computes attention itself instead of through transformers' AttentionInterface, "
            "so sinkscope cannot capture it; use a model family that supports `attn_implementation`"
        )


@contextmanager
def attention_implementation(model: transformers.PreTrainedModel, name: str) -> Iterator[None]:
    """Switch a model to the registered attention function `name` for the duration of the block."""
    previous = model.config._attn_implementation
    if previous != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if previous != name:
            model.set_attn_implementation(previous)


@contextmanager
def use_sinkscope_attention(model: transformers.PreTrainedModel) -> Iterator[None]:
    """Switch a model to the sinkscope attention function for the duration of the block."""
    check_supported(model)
    with attention_implementation(model, ATTN_NAME):
        yield


@contextmanager
def capture_session(
    model: transformers.PreTrainedModel,
    config: CaptureConfig,
    attention_mask: torch.Tensor,  # [batch, n] 1 for real tokens
    row_positions: torch.Tensor | None = None,  # [batch, sel] positions in padded coordinates
    column_positions: torch.Tensor | None = None,  # [batch, C] positions in padded coordinates
) -> Iterator[_Session]:
    """Collect one `LayerRecord` per attention call of every forward run inside the block."""
    session = _Session(config=config, query_valid=attention_mask.bool(), row_positions=row_positions,
                       column_positions=column_positions)
    with use_sinkscope_attention(model):
        token = _ACTIVE.set(session)
        try:
            yield session
        finally:
            _ACTIVE.reset(token)


def pad_to(x: torch.Tensor, n: int, dims: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Right-pad tensor x with `value` along each of `dims` up to length n."""
    for dim in dims:
        extra = n - x.shape[dim]
        if extra > 0:
            pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, extra]
            x = F.pad(x, pad, value=value)
    return x


def model_for(loaded: LoadedModel | transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    return loaded.model if isinstance(loaded, LoadedModel) else loaded
