"""Attention variants of the tiny LM, each a small change to softmax attention, registered as attention functions in
transformers' `AttentionInterface` under `tinylm_<variant>` (with `sdpa_mask` as their mask function):

    softmax      A_ij = exp(s_ij) / Σ_j' exp(s_ij')                          (s = q·k/√d + causal mask)
    off_by_one   A_ij = exp(s_ij) / (1 + Σ_j' exp(s_ij'))  — softmax with an extra zero logit (Miller 2023,
                 "Attention is off by one"); rows sum to < 1, the rest goes nowhere.
    sink_logit   A_ij = exp(s_ij) / (exp(b_h) + Σ_j' exp(s_ij'))  — a learnable logit b_h per head
                 (gpt-oss; Xiao et al. 2024 "learnable sink"), a parameter `self_attn.sinks` [heads] (init 0).
    gated        softmax attention, then o_i ← o_i ⊙ σ(x_i W_g + b_g) before the output projection: an elementwise
                 sigmoid gate computed from the layer's (normed) input x_i (Qiu et al. 2025, "Gated Attention for
                 LLMs", position G1). Parameters `self_attn.gate_proj` (d_model → heads·head_dim).

Choice: the extra parameters are attached to the stock `LlamaAttention` modules (no subclass), so checkpoints are
plain Llama checkpoints plus a few extra tensors. The gate is applied by two forward hooks (one stores the attention
input, one multiplies the output projection's input by the gate), so it stays part of the model whatever attention
function runs — including sinkscope's capture. Off-by-one and sink-logit change the attention weights themselves:
both are a learned sink logit per head (fixed at 0 for off-by-one), which each attention module declares to
sinkscope's capture through `sinkscope_sink_logits` (`sinkscope.capture.attention.module_sink_logits`): a
non-persistent zeros buffer for off-by-one, the name "sinks" for sink-logit. So `run_capture` measures every variant
with the probabilities it really uses, and `statistics.attention_stats` is one `run_capture` call. The functions
registered here serve training and plain inference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sinkscope.capture.attention import SINK_LOGITS_ATTR, additive_bias
from sinkscope.errors import SinkscopeError

VARIANTS: tuple[str, ...] = ("softmax", "off_by_one", "sink_logit", "gated")
ATTN_NAMES: dict[str, str] = {v: f"tinylm_{v}" for v in VARIANTS}


def softmax_off_by_one(scores: torch.Tensor) -> torch.Tensor:
    """Softmax with an extra zero logit: A_i = exp(x_i) / (1 + Σ_j exp(x_j)). Rows sum to < 1.

    Source: E. Miller 2023, "Attention is off by one" (softmax₁). Computed as softmax([x, 0])[:-1], which is stable.
    scores: [..., key] (−inf for masked keys) -> [..., key]
    """
    zero = torch.zeros_like(scores[..., :1])
    return torch.softmax(torch.cat([scores, zero], dim=-1), dim=-1)[..., :-1]


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Softmax with one learned logit b_h per head: A_i = exp(x_i) / (exp(b_h) + Σ_j exp(x_j)). Rows sum to < 1.

    Source: gpt-oss (OpenAI 2025) attention sinks, as in transformers' `GptOssAttention` eager function.
    scores: [batch, head, query, key]; sink: [head] -> [batch, head, query, key]
    """
    b, h, q, _ = scores.shape
    extra = sink.to(scores.dtype).reshape(1, h, 1, 1).expand(b, h, q, 1)
    return torch.softmax(torch.cat([scores, extra], dim=-1), dim=-1)[..., :-1]


def variant_probs(
    variant: str,
    module: nn.Module,
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, h, k, d]  (KV heads already repeated)
    bias: torch.Tensor,  # [b|1, 1|h, q, k]
    scaling: float,
) -> torch.Tensor:
    """The variant's attention weights in float32. Returns [b, h, q, k]; fully masked rows are all zeros."""
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling + bias
    if variant == "off_by_one":
        probs = softmax_off_by_one(scores)
    elif variant == "sink_logit":
        probs = softmax_with_sink(scores, module.sinks.float())
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def _make_attention(variant: str) -> Callable[..., tuple[torch.Tensor, None]]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,  # [b, h, q, d]
        key: torch.Tensor,  # [b, kv_h, k, d]
        value: torch.Tensor,  # [b, kv_h, k, d_v]
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Attention output [b, q, h, d_v] of this variant (SDPA for softmax and gated)."""
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if variant in ("softmax", "gated"):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        bias = additive_bias(attention_mask, query, key, bool(is_causal), None)
        probs = variant_probs(variant, module, query, key, bias, scaling)
        if dropout and module.training:
            probs = nn.functional.dropout(probs, p=dropout)
        out = probs.to(value.dtype) @ value  # [b, h, q, d_v]
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = f"tinylm_{variant}_attention"
    return attention


for _variant in VARIANTS:
    AttentionInterface.register(ATTN_NAMES[_variant], _make_attention(_variant))
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAMES[_variant], sdpa_mask)


def _stash_gate_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on self_attn: keep its input x [b, q, d_model] for the output gate."""
    module._gate_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _gate_hook(attn: nn.Module) -> Callable[[nn.Module, tuple], tuple]:
    def hook(_o_proj: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook on o_proj: o [b, q, h·d] ← o ⊙ σ(x W_g + b_g)."""
        x = attn._gate_input
        attn._gate_input = None
        return (args[0] * torch.sigmoid(attn.gate_proj(x)),)

    return hook


def apply_variant(model: LlamaForCausalLM, variant: str, seed: int = 0) -> LlamaForCausalLM:
    """Give a Llama model the attention `variant` (in place): its parameters, hooks and attention function.

    New parameters: sink_logit → `self_attn.sinks` [heads] = 0; gated → `self_attn.gate_proj` (weights N(0, 0.02²)
    from `seed`, bias 0). The sink logits sinkscope's capture reads (`sinkscope_sink_logits`): off_by_one → a
    non-persistent zeros buffer [heads] (not saved); sink_logit → "sinks". Calling it again is a no-op for parameters
    that already exist.
    """
    check_variant(variant)
    config = model.config
    gen = torch.Generator().manual_seed(seed + 7919)
    p = next(model.parameters())
    for layer in model.model.layers:
        attn = layer.self_attn
        heads, head_dim = config.num_attention_heads, attn.head_dim
        if variant == "sink_logit":
            if not hasattr(attn, "sinks"):
                attn.sinks = nn.Parameter(torch.zeros(heads, device=p.device, dtype=p.dtype))
            setattr(attn, SINK_LOGITS_ATTR, "sinks")
        if variant == "off_by_one" and not hasattr(attn, SINK_LOGITS_ATTR):
            attn.register_buffer(SINK_LOGITS_ATTR, torch.zeros(heads, device=p.device, dtype=p.dtype),
                                 persistent=False)
        if variant == "gated" and not hasattr(attn, "gate_proj"):
            gate = nn.Linear(config.hidden_size, heads * head_dim, bias=True)
            with torch.no_grad():
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * config.initializer_range)
                gate.bias.zero_()
            attn.gate_proj = gate.to(device=p.device, dtype=p.dtype)
            attn._gate_input = None
            attn.register_forward_pre_hook(_stash_gate_input, with_kwargs=True)
            attn.o_proj.register_forward_pre_hook(_gate_hook(attn))
    config.sinkscope_variant = variant
    model.set_attn_implementation(ATTN_NAMES[variant])
    return model


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise SinkscopeError(f"unknown attention variant '{variant}': use one of {', '.join(VARIANTS)}")
    return variant


def variant_of(model: transformers.PreTrainedModel) -> str:
    return getattr(model.config, "sinkscope_variant", None) or "softmax"

