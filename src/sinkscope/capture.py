"""Capture attention statistics inside the forward pass, without materialising every layer's n×n maps.

sinkscope registers an attention function named ``"sinkscope"`` in transformers' `AttentionInterface`. While a
capture session is active, each attention layer (1) computes its output exactly as the model's native backend
would (SDPA, or the model's own eager function where SDPA cannot express it: logit soft-capping, learned sink
logits) and (2) recomputes softmax(QKᵀ·scale + mask) in query chunks, in float32, to accumulate statistics.
Extra memory is O(chunk × n) per head; only what the caller asks for (`CaptureConfig`) is kept.
"""

from __future__ import annotations

import contextvars
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel

ATTN_NAME = "sinkscope"


class ProbsHook(Protocol):
    """An intervention: changes a layer's attention probabilities [b, h, q, k] inside the forward pass."""

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
    values: per-KV-head value vectors v_j.
    chunk_size: queries per chunk in the recomputation (None: sized to keep a chunk near 32 MB).
    fused: compute the layer output from the same float32 chunks as the statistics (A·V) instead of calling the
        native kernel as well — one attention computation instead of two; outputs then equal SDPA's up to float32
        rounding (≈1e-6), not bit for bit.
    """

    rows: str | Sequence[int] | None = "last"
    entropy: bool = True
    maps: bool = False
    max_map_tokens: int = 512
    head_outputs: bool = False
    values: bool = False
    chunk_size: int | None = None
    fused: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rows, str) and self.rows != "last":
            raise SinkscopeError(f"rows must be 'last', a list of positions or None, not '{self.rows}'")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise SinkscopeError("chunk_size must be a positive number of queries")


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


@dataclass
class _Session:
    config: CaptureConfig
    query_valid: torch.Tensor  # [batch, n] bool, padded positions False
    row_positions: torch.Tensor | None  # [batch, sel] long, in padded coordinates
    records: list[LayerRecord] = field(default_factory=list)


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
    bias = _additive_bias(attention_mask, query, key, bool(is_causal), kwargs.get("position_bias"))
    softcap, s_aux = kwargs.get("softcap"), kwargs.get("s_aux")
    layer = getattr(module, "layer_idx", None)
    hooks = [hook for hook in _HOOKS.get() if hook.applies(layer)]
    session = _ACTIVE.get()
    probs = None
    if hooks:
        probs = attention_probs(query, key, bias, scaling, softcap, s_aux)  # [b, h, q, k]
        for hook in hooks:
            probs = hook(probs, layer, bias)
        output = _weighted_values(probs, value).to(query.dtype)
    elif session is not None and session.config.fused:
        record, output = _statistics(session, query, key, value, bias, scaling, softcap, s_aux, want_output=True)
        session.records.append(record)
        return output.to(query.dtype), None
    else:
        output = _native_output(module, query, key, value, attention_mask, bias, scaling, dropout, kwargs)
    if session is not None:
        session.records.append(_statistics(session, query, key, value, bias, scaling, softcap, s_aux, probs)[0])
    return output, None


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
    scores = scores.reshape(b, h, nq, nk) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + bias
    if s_aux is not None:
        sink = s_aux.float().reshape(1, h, 1, 1).expand(b, h, nq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


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
    bias: torch.Tensor,
    scaling: float,
    dropout: float,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """What the model would compute without sinkscope: SDPA, or the model's eager function for soft-capping and
    learned sink logits (which SDPA does not support)."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise SinkscopeError(
                f"{type(module).__name__} uses soft-capping or sink logits but its module has no eager attention "
                "function; sinkscope cannot reproduce its output"
            )
        mask = bias.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        out, _ = eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        return out
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return out


def _additive_bias(
    mask: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    is_causal: bool,
    position_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The mask as a float32 additive bias with -inf at invisible keys. Returns [batch|1, 1|head, q, k]."""
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


def _chunk_size(config: CaptureConfig, batch: int, heads: int, nk: int) -> int:
    if config.chunk_size is not None:
        return config.chunk_size
    budget = 32 * 2**20 // 4  # floats per chunk of scores
    return max(1, min(4096, budget // max(1, batch * heads * nk)))


def _statistics(
    session: _Session,
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d]
    value: torch.Tensor,  # [b, kvh, k, dv]
    bias: torch.Tensor,  # [b|1, 1|h, q, k]
    scaling: float,
    softcap: float | None,
    s_aux: torch.Tensor | None,  # [h] learned sink logits
    probs_full: torch.Tensor | None = None,  # [b, h, q, k] when an intervention already computed (and changed) them
    want_output: bool = False,
) -> tuple[LayerRecord, torch.Tensor | None]:
    """Recompute softmax(QKᵀ·scale + bias) chunk by chunk in float32 and reduce it to the requested statistics;
    with `want_output`, also the layer's attention output A·V [b, q, h, dv] (float32) from the same chunks."""
    cfg = session.config
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    qvalid = session.query_valid[:, -nq:].to(query.device)  # [b, q]
    want_maps = cfg.maps and nk <= cfg.max_map_tokens
    sel = session.row_positions.to(query.device) - (session.query_valid.shape[1] - nq) \
        if session.row_positions is not None else None  # [b, s]

    key_mass_sum = torch.zeros(b, h, nk, device=query.device)
    key_count = torch.zeros(b, nk, device=query.device)
    entropy = torch.zeros(b, h, nq, device=query.device) if cfg.entropy else None
    sink_share = torch.zeros(b, h, nq, device=query.device) if s_aux is not None else None
    rows = torch.zeros(b, h, sel.shape[1], nk, device=query.device) if sel is not None else None
    maps = torch.zeros(b, h, nq, nk, device=query.device) if want_maps else None
    outs = torch.zeros(b, h, nq, value.shape[-1], device=query.device) if cfg.head_outputs else None
    layer_out = torch.empty(b, nq, h, value.shape[-1], device=query.device) if want_output else None

    step = _chunk_size(cfg, b, h, nk)
    for c0 in range(0, nq, step):
        c1 = min(nq, c0 + step)
        chunk_bias = bias[:, :, c0:c1]
        if probs_full is not None:
            probs = probs_full[:, :, c0:c1]
        else:
            probs = attention_probs(query[:, :, c0:c1], key, chunk_bias, scaling, softcap, s_aux)
        if sink_share is not None:
            sink_share[:, :, c0:c1] = 1.0 - probs.sum(-1)
        valid = qvalid[:, None, c0:c1, None].float()  # [b, 1, c, 1]
        key_mass_sum += (probs * valid).sum(-2)
        seen = torch.isfinite(chunk_bias).expand(b, 1, c1 - c0, nk)[:, 0] & qvalid[:, c0:c1, None]
        key_count += seen.sum(-2)
        if entropy is not None:
            entropy[:, :, c0:c1] = -torch.special.xlogy(probs, probs).sum(-1)
        if maps is not None:
            maps[:, :, c0:c1] = probs
        if outs is not None or layer_out is not None:
            chunk_out = _weighted_values(probs, value)  # [b, c, h, dv]
            if outs is not None:
                outs[:, :, c0:c1] = chunk_out.transpose(1, 2)
            if layer_out is not None:
                layer_out[:, c0:c1] = chunk_out
        if rows is not None:
            _gather_rows(rows, probs, sel, c0, c1)
    record = LayerRecord(
        key_mass_sum=key_mass_sum,
        key_count=key_count,
        rows=rows,
        entropy=entropy,
        sink_share=sink_share,
        maps=maps,
        head_outputs=outs,
        values=value.float().clone() if cfg.values else None,
    )
    return record, layer_out


def _gather_rows(rows: torch.Tensor, probs: torch.Tensor, sel: torch.Tensor, c0: int, c1: int) -> None:
    """Copy the rows of selected queries that fall in chunk [c0, c1) into rows [b, h, s, k]."""
    inside = (sel >= c0) & (sel < c1)  # [b, s]
    if not inside.any():
        return
    bi, si = inside.nonzero(as_tuple=True)
    rows[bi, :, si] = probs[bi, :, sel[bi, si] - c0]


def _sinkscope_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """SDPA's boolean mask, always materialised, so the statistics see exactly which keys each query sees."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
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
def use_sinkscope_attention(model: transformers.PreTrainedModel) -> Iterator[None]:
    """Switch a model to the sinkscope attention function for the duration of the block."""
    check_supported(model)
    previous = model.config._attn_implementation
    if previous != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        if previous != ATTN_NAME:
            model.set_attn_implementation(previous)


@contextmanager
def capture_session(
    model: transformers.PreTrainedModel,
    config: CaptureConfig,
    attention_mask: torch.Tensor,  # [batch, n] 1 for real tokens
    row_positions: torch.Tensor | None = None,  # [batch, sel] positions in padded coordinates
) -> Iterator[_Session]:
    """Collect one `LayerRecord` per attention call of every forward run inside the block."""
    session = _Session(config=config, query_valid=attention_mask.bool(), row_positions=row_positions)
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
