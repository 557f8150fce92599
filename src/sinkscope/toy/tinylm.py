"""Train small Llama-architecture language models and watch attention sinks emerge.

`train(TrainConfig(...))` trains a `transformers.LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU, tied embeddings) on a
text corpus, on the synthetic Bigram-Backcopy task, or on a mix of both, with a byte-level BPE tokenizer trained by
the `tokenizers` library whose `PreTrainedTokenizerFast` prepends BOS (`<s>`) to every sequence. Every training
sequence is `<s>` followed by seq_len − 1 tokens. A run folder holds:

    OUT/tokenizer/        the tokenizer (trained once, reused on resume)
    OUT/checkpoint/       the latest `save_pretrained` checkpoint (safetensors) + train_state.pt (optimizer, step)
    OUT/model/            the final model (save_pretrained + tokenizer), written when the run completes
    OUT/trace.parquet     the emergence trace (`TRACE_COLUMNS`), one row per (step, layer, head)
    OUT/manifest.json     sinkscope run manifest (`sinkscope.store.load_run(OUT)["trace"]` reads the trace)

Training is deterministic per seed: the model is initialised from `seed`, and the batch of step s is drawn from a
generator seeded with (seed, s), so a run killed and resumed from its last checkpoint (`resume=True`) ends with the
same weights and trace as an uninterrupted one (on CPU; GPU kernels may differ in the last bits).

Attention variants (`VARIANTS`), each a small change to softmax attention, registered as attention functions in
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
input, one multiplies the output projection's input by the gate), so it stays active whatever attention function
runs — including sinkscope's capture, which therefore measures gated models correctly. Off-by-one and sink-logit
change the attention weights themselves; sinkscope's capture (which recomputes plain softmax) does not know them,
so the emergence trace computes its statistics here (`attention_stats`) from the probabilities the variant really
uses. For softmax models the statistic is the same as sinkscope's capture `key_mass` (tested). Load variant
checkpoints with `load_checkpoint` (which restores the parameters, hooks and attention function); plain
`LlamaForCausalLM.from_pretrained` loads only softmax checkpoints faithfully.

Trace statistics, per layer l and head h, on a fixed held-out batch (Gu et al. 2025, "When Attention Sink Emerges
in Language Models"):

    α₀[l, h]   column mass of position 0: mean over the queries i that see key 0 of A_i0 (sinkscope `column_mass`)
    share_ε[l] fraction of heads of layer l with α₀ > ε, for ε = 0.2 and 0.3 (sinkscope `sink_rate`)
    norm_ratio ‖h_0‖₂ / median_{i≥1} ‖h_i‖₂ of the residual stream after layer l (massive activations at the sink)
    null_mass  mean over queries of 1 − Σ_j A_ij (the share that goes to the extra/learned logit; 0 for softmax)

`trace.parquet` columns (`TRACE_COLUMNS`): step, tokens (seen so far), layer, head, alpha0, null_mass, sink_02 and
sink_03 (α₀ > ε for this head), share_02 and share_03 (per layer), norm0 and norm_median (‖h_0‖ and the median
‖h_i‖, i ≥ 1, per layer), norm_ratio, eval_loss (held-out batch), train_loss (mean over the steps since the previous
evaluation; at step 0 the untrained model's loss on the first batch), lr, time_s.
"""

from __future__ import annotations

import contextvars
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers
from torch import nn
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sinkscope.capture import attention_implementation
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel, model_info
from sinkscope.store import Run, load_run, make_manifest, save_run

VARIANTS: tuple[str, ...] = ("softmax", "off_by_one", "sink_logit", "gated")
ATTN_NAMES: dict[str, str] = {v: f"tinylm_{v}" for v in VARIANTS}
EPSILONS: tuple[float, ...] = (0.2, 0.3)
TRACE_COLUMNS: tuple[str, ...] = (
    "step", "tokens", "layer", "head", "alpha0", "null_mass", "sink_02", "sink_03", "share_02", "share_03",
    "norm0", "norm_median", "norm_ratio", "eval_loss", "train_loss", "lr", "time_s",
)
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
TINY_DIR_NAME = "sinkscope-tiny"


# ---------------------------------------------------------------------------------------------------------------
# Attention variants
# ---------------------------------------------------------------------------------------------------------------


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


def _bias(mask: torch.Tensor | None, nq: int, nk: int, device: torch.device, is_causal: bool) -> torch.Tensor:
    """The attention mask as a float32 additive bias (0 visible, −inf hidden). Returns [batch|1, 1|head, q, k]."""
    if mask is None:
        visible = torch.ones(nq, nk, dtype=torch.bool, device=device)
        if is_causal and nq > 1:
            visible = torch.arange(nq, device=device)[:, None] + (nk - nq) >= torch.arange(nk, device=device)
        return torch.zeros(1, 1, nq, nk, device=device).masked_fill(~visible, -math.inf)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)[..., -nk:]
    bias = mask.float()
    return bias.masked_fill(bias <= torch.finfo(mask.dtype).min / 2, -math.inf)[..., -nk:]


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


@dataclass
class _Recorder:
    """Statistics of every attention call while `_RECORDING` is set (one dict per layer, in call order)."""

    query_valid: torch.Tensor  # [b, n] bool
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)


_RECORDING: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("tinylm_recorder", default=None)


def _record(rec: _Recorder, probs: torch.Tensor, bias: torch.Tensor) -> None:
    """Reduce probs [b, h, q, k] to column-mass sums, query counts and the null mass; append to the recorder."""
    b, _, nq, nk = probs.shape
    qvalid = rec.query_valid[:, -nq:].to(probs.device)  # [b, q]
    qv = qvalid[:, None, :, None].float()
    seen = torch.isfinite(bias).expand(b, 1, nq, nk)[:, 0] & qvalid[:, :, None]  # [b, q, k]
    rec.layers.append({
        "key_mass_sum": (probs * qv).sum(-2).cpu(),  # [b, h, k]
        "key_count": seen.sum(-2).float().cpu(),  # [b, k]
        "null_sum": ((1.0 - probs.sum(-1)) * qvalid[:, None, :].float()).sum(-1).cpu(),  # [b, h]
        "n_queries": qvalid.sum(-1).float().cpu(),  # [b]
    })


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
        """Attention output [b, q, h, d_v] of this variant; statistics when a recorder is active."""
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        rec = _RECORDING.get()
        plain = variant in ("softmax", "gated")
        if plain and rec is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        bias = _bias(attention_mask, query.shape[2], key.shape[2], query.device, bool(is_causal))
        probs = variant_probs(variant, module, query, key, bias, scaling)
        if rec is not None:
            _record(rec, probs, bias)
        if plain:  # the output is SDPA's, exactly as without recording
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)
            return out, None
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
    from `seed`, bias 0). Calling it again is a no-op for parameters that already exist.
    """
    check_variant(variant)
    config = model.config
    gen = torch.Generator().manual_seed(seed + 7919)
    p = next(model.parameters())
    for layer in model.model.layers:
        attn = layer.self_attn
        heads, head_dim = config.num_attention_heads, attn.head_dim
        if variant == "sink_logit" and not hasattr(attn, "sinks"):
            attn.sinks = nn.Parameter(torch.zeros(heads, device=p.device, dtype=p.dtype))
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


# ---------------------------------------------------------------------------------------------------------------
# Attention statistics (the emergence trace)
# ---------------------------------------------------------------------------------------------------------------


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
                rec = _Recorder(query_valid=mask.bool())
                token = _RECORDING.set(rec)
                try:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                finally:
                    _RECORDING.reset(token)
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


# ---------------------------------------------------------------------------------------------------------------
# Data: corpus files, tokenizer, token streams, synthetic sequences
# ---------------------------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".jsonl")


def corpus_files(path: str | Path) -> list[Path]:
    """The text files of `--data`: a .txt/.jsonl file, or a folder: its own .txt/.jsonl files plus, from each
    subfolder, `test.jsonl` if present, else its .txt files (so `/work/shared/data` gives every `*/test.jsonl`,
    tiny_shakespeare included, and never the `orig/` copies)."""
    p = Path(path)
    if not p.exists():
        raise SinkscopeError(f"--data {p} does not exist: pass a .txt or .jsonl file or a folder of them")
    if p.is_file():
        if p.suffix not in TEXT_SUFFIXES:
            raise SinkscopeError(f"--data {p} is not a .txt or .jsonl file")
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in TEXT_SUFFIXES)
    for sub in sorted(d for d in p.iterdir() if d.is_dir()):
        files += [sub / "test.jsonl"] if (sub / "test.jsonl").is_file() else sorted(sub.glob("*.txt"))
    if not files:
        raise SinkscopeError(f"--data {p} holds no .txt or .jsonl files (nor */test.jsonl)")
    return files


def read_documents(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file gives the string `text` field of each row (others skipped)."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    docs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
            docs.append(row["text"])
    return docs


def split_documents(docs: list[str], every: int = 20) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th document (index ≡ every/2) is held out; with fewer documents, the last
    1/every of each document's characters is."""
    if len(docs) >= every:
        return ([d for i, d in enumerate(docs) if i % every != every // 2],
                [d for i, d in enumerate(docs) if i % every == every // 2])
    cut = [len(d) - len(d) // every for d in docs]
    return [d[:c] for d, c in zip(docs, cut, strict=True)], [d[c:] for d, c in zip(docs, cut, strict=True) if d[c:]]


def load_corpus(path: str | Path) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Read every corpus file and split it. Returns (train docs, held-out docs, per-file source records)."""
    train_docs: list[str] = []
    held: list[str] = []
    sources = []
    for f in corpus_files(path):
        docs = read_documents(f)
        if not docs:
            continue
        tr, he = split_documents(docs)
        train_docs += tr
        held += he
        sources.append({"file": str(f), "documents": len(docs), "chars": sum(map(len, docs))})
    if not train_docs or not held:
        raise SinkscopeError(f"--data {path} has no usable text (jsonl rows need a non-empty 'text' field)")
    return train_docs, held, sources


def _wrap_tokenizer(core: Any) -> PreTrainedTokenizerFast:
    from tokenizers import processors

    bos = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1",
                                                        special_tokens=[(BOS, bos)])
    unk = UNK if core.token_to_id(UNK) is not None else None
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=unk, padding_side="right")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, `tokenizers` BpeTrainer) whose encodings start with `<s>`.

    Specials: `<s>` (BOS, id 0), `</s>` (EOS, 1), `<pad>` (2); then the 256 byte symbols, then merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise SinkscopeError(f"vocab size {vocab_size} is too small for byte-level BPE: use at least 300")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    core.train_from_iterator(texts, trainer=trainer)
    return _wrap_tokenizer(core)


def word_tokenizer(n_symbols: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer for synthetic data: `<s> </s> <pad> <unk>` then symbols t0 … t{n−1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate((BOS, EOS, PAD, UNK))}
    vocab.update({f"t{i}": 4 + i for i in range(n_symbols)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap_tokenizer(core)


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by `</s>`, no BOS. Returns [T] int64."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.long)


@dataclass
class BigramBackcopy:
    """The Bigram-Backcopy task (Guo et al. 2024, "Active-Dormant Attention Heads", §2): tokens follow a sparse
    random bigram chain, except that after a trigger token the next token copies the token before the trigger.
    Heads that implement the copy are only needed after triggers and learn to park their attention on BOS
    (a dormant head = an attention sink) everywhere else.

    ids: [V] token ids of the alphabet; succ: [V, k] successor indices; cdf: [V, k]; trigger: [V] bool.
    """

    ids: torch.Tensor
    succ: torch.Tensor
    cdf: torch.Tensor
    trigger: torch.Tensor

    @classmethod
    def make(cls, ids: Sequence[int], n_triggers: int = 3, branching: int = 8, seed: int = 0,
             trigger_ids: Sequence[int] = ()) -> BigramBackcopy:
        """A fixed random instance over the token ids `ids` (the same `seed` gives the same chain).

        Triggers: `trigger_ids` if given (added to the alphabet), else `n_triggers` random members of `ids`.
        """
        gen = torch.Generator().manual_seed(seed)
        alphabet = list(ids) + list(trigger_ids)
        v = len(alphabet)
        succ = torch.stack([torch.randperm(v, generator=gen)[:branching] for _ in range(v)])
        w = -torch.log(torch.rand(v, branching, generator=gen).clamp(min=1e-9))  # Dirichlet(1) rows
        cdf = (w / w.sum(-1, keepdim=True)).cumsum(-1)
        trigger = torch.zeros(v, dtype=torch.bool)
        if trigger_ids:
            trigger[len(ids):] = True
        else:
            trigger[torch.randperm(v, generator=gen)[:n_triggers]] = True
        return cls(torch.tensor(alphabet, dtype=torch.long), succ, cdf, trigger)

    def sample(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """n sequences of `length` tokens (no BOS). Returns [n, length] token ids."""
        x = torch.empty(n, length, dtype=torch.long)
        starts = (~self.trigger).nonzero().squeeze(1)
        x[:, 0] = starts[torch.randint(len(starts), (n,), generator=gen)]
        for t in range(1, length):
            prev = x[:, t - 1]
            u = torch.rand(n, generator=gen)
            j = (self.cdf[prev] < u[:, None]).sum(-1).clamp(max=self.succ.shape[1] - 1)
            nxt = self.succ[prev, j]
            if t >= 2:
                nxt = torch.where(self.trigger[prev], x[:, t - 2], nxt)
            x[:, t] = nxt
        return self.ids[x]


SYNTHETIC: dict[str, str] = {
    "bigram_backcopy": "Bigram-Backcopy (Guo et al. 2024): sparse bigram chain; after a trigger, copy the token "
                       "before it. Alone: 64 symbols t0..t63, `synthetic_triggers` of them triggers. Mixed with "
                       "--data: the 64 most frequent text tokens plus `synthetic_triggers` dedicated trigger "
                       "tokens <bb0>, <bb1>, … added to the tokenizer (they never occur in text, so on text the "
                       "copying heads stay dormant).",
}


def check_synthetic(name: str | None) -> str | None:
    if name is not None and name not in SYNTHETIC:
        raise SinkscopeError(f"unknown synthetic task '{name}': use one of {', '.join(SYNTHETIC)}")
    return name


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the checkpoint; `resume` reuses the saved one)."""

    data: str | None = None  # text file or folder (see corpus_files)
    synthetic: str | None = None  # a SYNTHETIC task name
    synthetic_frac: float = 0.5  # share of each batch drawn from the synthetic task when data is also given
    synthetic_triggers: int = 3  # trigger tokens of the Bigram-Backcopy task
    synthetic_pool: int = 32768  # synthetic sequences drawn up front (batches pick from them)
    out: str = "runs/tinylm"
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128  # tokens per sequence, BOS included
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int | None = None  # warmup steps (default: 5% of steps)
    min_lr_frac: float = 0.1  # cosine decay to lr·min_lr_frac
    beta2: float = 0.95
    grad_clip: float = 1.0
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int | None = None  # SwiGLU width (default: 8/3·d_model rounded up to 16)
    vocab_size: int = 2048
    variant: str = "softmax"
    seed: int = 0
    eval_every: int = 100
    eval_batch: int = 16  # held-out sequences of seq_len in the fixed evaluation batch
    save_every: int | None = None  # default: eval_every
    device: str = "auto"  # auto: cuda if available, else cpu
    bf16: bool | None = None  # bf16 autocast (default: on for cuda)

    def validate(self) -> TrainConfig:
        check_variant(self.variant)
        check_synthetic(self.synthetic)
        if self.data is None and self.synthetic is None:
            raise SinkscopeError("nothing to train on: pass --data FILE_OR_DIR and/or --synthetic bigram_backcopy")
        if self.data is not None:
            corpus_files(self.data)
        for name in ("steps", "batch_size", "d_model", "layers", "heads", "eval_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise SinkscopeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 4:
            raise SinkscopeError("--seq-len must be at least 4 (BOS plus three tokens)")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise SinkscopeError(f"--d-model {self.d_model} must split into {self.heads} heads of even size")
        if self.lr <= 0 or self.weight_decay < 0:
            raise SinkscopeError("--lr must be positive and --weight-decay non-negative")
        if self.synthetic_pool < 1:
            raise SinkscopeError("the synthetic pool needs at least one sequence")
        if not 1 <= self.synthetic_triggers <= 32:
            raise SinkscopeError("the synthetic task needs between 1 and 32 trigger tokens")
        if not 0.0 <= self.synthetic_frac <= 1.0:
            raise SinkscopeError("synthetic fraction must be between 0 and 1")
        return self

    @property
    def ffn(self) -> int:
        return self.intermediate or 16 * math.ceil(8 * self.d_model / 3 / 16)


def llama_config(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The transformers config of a run: Llama (RoPE θ = 10⁴, RMSNorm, SwiGLU), tied embeddings, no biases."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=max(cfg.seq_len, 256), tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02, sinkscope_variant=cfg.variant, use_cache=False,
    )


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised model of the run (deterministic in cfg.seed), with its attention variant."""
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    return apply_variant(model, cfg.variant, cfg.seed)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                    ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a folder written by `train` (model/ or checkpoint/): the model with its variant, and the tokenizer."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").exists():
        raise SinkscopeError(f"{path} has no config.json: pass a run's model/ or checkpoint/ folder")
    config = LlamaConfig.from_pretrained(path)
    variant = check_variant(getattr(config, "sinkscope_variant", None) or "softmax")
    with _quiet():
        if variant == "softmax":
            model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            model = apply_variant(LlamaForCausalLM(config), variant)
            missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:
                raise SinkscopeError(f"{path} does not match a {variant} model (missing {missing}, extra {unexpected})")
            model.tie_weights()
            model.to(dtype)
    apply_variant(model, variant)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model.to(device).eval(), tokenizer


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' progress bars and load reports for the duration of the block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """Token sources of a run: train/held-out streams and/or the synthetic task."""

    tokenizer: PreTrainedTokenizerFast
    train: torch.Tensor | None  # [T] int64
    heldout: torch.Tensor | None  # [T'] int64
    synthetic: BigramBackcopy | None
    sources: list[dict[str, Any]]
    pool: torch.Tensor | None = None  # [S, seq_len − 1] pre-sampled synthetic sequences (int32)


def prepare_data(cfg: TrainConfig, tokenizer_dir: Path, with_pool: bool = True) -> Data:
    """Read/split the corpus, train (or reload) the tokenizer, encode the streams, build the synthetic task (and,
    with_pool, draw its pool of training sequences)."""
    train_docs = held = None
    sources: list[dict[str, Any]] = []
    if cfg.data is not None:
        train_docs, held, sources = load_corpus(cfg.data)
    triggers = [f"<bb{i}>" for i in range(cfg.synthetic_triggers)] if cfg.synthetic and train_docs else []
    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size) if train_docs else word_tokenizer(64)
        if triggers:
            tokenizer.add_special_tokens({"additional_special_tokens": triggers})
        tokenizer.save_pretrained(tokenizer_dir)
    train_ids = encode_stream(tokenizer, train_docs) if train_docs else None
    held_ids = encode_stream(tokenizer, held) if held else None
    for stream, name in ((train_ids, "training"), (held_ids, "held-out")):
        if stream is not None and len(stream) < cfg.seq_len:
            raise SinkscopeError(f"the {name} text has {len(stream)} tokens, fewer than --seq-len {cfg.seq_len}; "
                                 "give more text or a shorter --seq-len")
    task = None
    if cfg.synthetic is not None:
        if train_ids is None:
            alphabet = [tokenizer.convert_tokens_to_ids(f"t{i}") for i in range(64)]
            task = BigramBackcopy.make(alphabet, n_triggers=cfg.synthetic_triggers, seed=0)
        else:
            specials = set(tokenizer.all_special_ids)
            counts = torch.bincount(train_ids, minlength=len(tokenizer))
            alphabet = [int(i) for i in counts.argsort(descending=True, stable=True) if int(i) not in specials][:64]
            task = BigramBackcopy.make(alphabet, seed=0, trigger_ids=tokenizer.convert_tokens_to_ids(triggers))
    pool = None
    if task is not None and with_pool:  # sampling is sequential in the position: draw many sequences up front
        pool = task.sample(cfg.synthetic_pool, cfg.seq_len - 1, torch.Generator().manual_seed(cfg.seed + 1))
        pool = pool.to(torch.int32)
    return Data(tokenizer=tokenizer, train=train_ids, heldout=held_ids, synthetic=task, sources=sources, pool=pool)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def make_batch(cfg: TrainConfig, data: Data, step: int) -> torch.Tensor:
    """The training batch of `step`, a pure function of (seed, step): [B, seq_len], column 0 = BOS."""
    gen = _step_generator(cfg.seed, step)
    bos = data.tokenizer.bos_token_id
    n = cfg.seq_len - 1
    n_syn = 0 if data.synthetic is None else (
        cfg.batch_size if data.train is None else round(cfg.synthetic_frac * cfg.batch_size))
    rows = []
    if cfg.batch_size - n_syn > 0:
        starts = torch.randint(0, len(data.train) - n + 1, (cfg.batch_size - n_syn,), generator=gen)
        rows.append(data.train[starts[:, None] + torch.arange(n)])
    if n_syn:
        rows.append(data.pool[torch.randint(0, len(data.pool), (n_syn,), generator=gen)].long())
    body = torch.cat(rows)
    return torch.cat([torch.full((cfg.batch_size, 1), bos, dtype=torch.long), body], dim=1)


def eval_batch(cfg: TrainConfig, data: Data) -> torch.Tensor:
    """The fixed held-out batch (same for every seed): evenly spaced windows of the held-out text, or synthetic
    sequences from a fixed generator when there is no text. Returns [eval_batch, seq_len], column 0 = BOS."""
    n = cfg.seq_len - 1
    bos = data.tokenizer.bos_token_id
    if data.heldout is not None:
        starts = torch.linspace(0, len(data.heldout) - n, cfg.eval_batch).long().tolist()
        body = torch.stack([data.heldout[s : s + n] for s in starts])
    else:
        body = data.synthetic.sample(cfg.eval_batch, n, torch.Generator().manual_seed(12345))
    return torch.cat([torch.full((body.shape[0], 1), bos, dtype=torch.long), body], dim=1)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to lr·min_lr_frac."""
    warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(β = (0.9, β₂)); weight decay on matrices and embeddings only (not norms, biases, sink logits)."""
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for _, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SinkscopeError(f"unknown device '{device}': use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SinkscopeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return dev


@dataclass
class TrainResult:
    out: Path
    trace: pd.DataFrame
    steps_done: int
    completed: bool
    elapsed_s: float
    final: AttentionStats | None


def _save_checkpoint(out: Path, model: nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer, step: int,
                     cfg: TrainConfig) -> None:
    """Write OUT/checkpoint atomically (tmp folder, then rename), so a kill never leaves a half-written one."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": asdict(cfg)}, tmp / "train_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):
        if (out / name / "train_state.pt").exists():
            return out / name
    return None


def _write_trace(out: Path, trace: pd.DataFrame, manifest: dict[str, Any]) -> None:
    save_run(out, Run(tables={"trace": trace}, manifest=manifest))


def saved_config(out: str | Path) -> TrainConfig | None:
    """The TrainConfig stored in OUT/train_config.json, or None."""
    path = Path(out) / "train_config.json"
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in raw.items() if k in names})


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = False,
    stop_after: int | None = None,
    time_limit_s: float | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a model as `cfg` says, writing the run folder cfg.out (see the module docstring).

    resume: continue the run in cfg.out from its last checkpoint, with the configuration saved there (only `steps`,
        `device` and `bf16` are taken from `cfg`); without a checkpoint it starts from scratch.
    stop_after: stop (as if killed) right after the checkpoint of this step — for tests of resumption.
    time_limit_s: a safety net for fixed budgets: once this process has trained this long, evaluate, save and
        finish early (`TrainResult.steps_done` < cfg.steps; the learning rate has not fully decayed then).
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SinkscopeError(f"--out {out} is a file; pass a folder")
    ckpt = _latest_checkpoint(out) if out.exists() else None
    if ckpt is not None and not resume:
        raise SinkscopeError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    if resume and ckpt is not None:
        stored = saved_config(out) or TrainConfig(**{
            k: v for k, v in torch.load(ckpt / "train_state.pt", weights_only=True)["config"].items()
            if k in {f.name for f in fields(TrainConfig)}})
        cfg = TrainConfig(**{**asdict(stored), "steps": cfg.steps, "device": cfg.device, "bf16": cfg.bf16,
                             "out": str(out)})
    cfg.validate()
    device = resolve_device(cfg.device)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    say = log or (lambda _msg: None)
    data = prepare_data(cfg, out / "tokenizer")
    held = eval_batch(cfg, data)

    trace = pd.DataFrame(columns=list(TRACE_COLUMNS))
    start = 0
    elapsed0 = 0.0
    if resume and ckpt is not None:
        model, _ = load_checkpoint(ckpt, device=device)
        state = torch.load(ckpt / "train_state.pt", weights_only=True, map_location=device)
        start = int(state["step"])
        optimizer = make_optimizer(model, cfg)
        optimizer.load_state_dict(state["optimizer"])
        if (out / "trace.parquet").exists():
            trace = pd.read_parquet(out / "trace.parquet")
            trace = trace[trace["step"] <= start].reset_index(drop=True)
            elapsed0 = float(trace["time_s"].max()) if len(trace) else 0.0
        say(f"resuming {out} at step {start}")
    else:
        model = build_model(cfg, data.tokenizer).to(device)
        optimizer = make_optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = make_manifest(
        "train-lm", {"name": "tinylm", "model_type": "llama", "variant": cfg.variant, "parameters": n_params,
                     "d_model": cfg.d_model, "layers": cfg.layers, "heads": cfg.heads, "vocab": len(data.tokenizer)},
        {**asdict(cfg), "device": str(device), "bf16": bf16, "sources": data.sources}, cfg.seed)
    save_every = cfg.save_every or cfg.eval_every
    tokens_per_step = cfg.batch_size * cfg.seq_len
    run_t0 = time.perf_counter()
    t0 = run_t0 - elapsed0

    def evaluate(step: int, train_loss: float) -> AttentionStats:
        nonlocal trace
        stats = attention_stats(model, held)
        rows = trace_rows(step, step * tokens_per_step, stats, train_loss, lr_at(cfg, max(0, step - 1)),
                          time.perf_counter() - t0)
        trace = rows if trace.empty else pd.concat([trace, rows], ignore_index=True)
        _write_trace(out, trace, manifest)
        return stats

    if start == 0:  # step 0: the untrained model; its "train loss" is the loss on the first batch
        with torch.no_grad():
            first = make_batch(cfg, data, 1).to(device)
            evaluate(0, float(model(input_ids=first, labels=first, use_cache=False).loss))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    bar_ctx = _progress_bar(progress)
    final: AttentionStats | None = None
    step = start
    loss_sum, loss_n, shown = torch.zeros((), device=device), 0, float("nan")
    with bar_ctx as bar:
        task = bar.add_task("training", total=cfg.steps, completed=start, loss=shown, a0=float("nan")) \
            if bar else None
        model.train()
        for step in range(start + 1, cfg.steps + 1):
            lr = lr_at(cfg, step - 1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = make_batch(cfg, data, step).to(device, non_blocking=True)
            with autocast:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_sum += loss.detach().float()
            loss_n += 1
            last = step == cfg.steps or (time_limit_s is not None and time.perf_counter() - run_t0 > time_limit_s)
            if step % cfg.eval_every == 0 or last:
                train_loss = float(loss_sum) / loss_n  # mean over the steps since the previous evaluation
                loss_sum.zero_()
                loss_n = 0
                shown = train_loss
                final = evaluate(step, train_loss)
                later = final.alpha0()[1:] if final.alpha0().shape[0] > 1 else final.alpha0()
                say(f"step {step}: train loss {train_loss:.3f}, eval loss {final.loss:.3f}, α₀ (layers ≥ 1) "
                    f"{float(later.mean()):.3f}, heads α₀>0.3 {float((later > 0.3).float().mean()):.0%}")
                if bar:
                    bar.update(task, a0=float(later.mean()))
            if step % save_every == 0 or last:
                _save_checkpoint(out, model, data.tokenizer, optimizer, step, cfg)
            if bar:
                bar.update(task, completed=step, loss=shown)
            if stop_after is not None and step >= stop_after and step % save_every == 0:
                return TrainResult(out, trace, step, False, time.perf_counter() - t0, final)
            if last:
                if step < cfg.steps:
                    say(f"time limit of {time_limit_s:.0f} s reached: stopped at step {step} of {cfg.steps}")
                break
    final_dir = out / "model"
    shutil.rmtree(final_dir, ignore_errors=True)
    with _quiet():
        model.save_pretrained(final_dir)
    data.tokenizer.save_pretrained(final_dir)
    if final is None:
        final = attention_stats(model, held)
    return TrainResult(out, trace, step, True, time.perf_counter() - t0, final)


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}  α₀ {task.fields[a0]:.3f}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)


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


# ---------------------------------------------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------------------------------------------


def tiny_dir() -> Path:
    """The folder of the shipped `sinkscope-tiny` model inside the installed package."""
    from importlib.resources import files

    return Path(str(files("sinkscope") / "assets" / TINY_DIR_NAME))


def load_tiny(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the shipped `sinkscope-tiny` decoder (offline, plain transformers Llama + its tokenizer, which adds BOS).

    Its measured sink figures are in `sinks.json` next to it, its recipe in the model card (README.md there).
    """
    path = tiny_dir()
    if not (path / "model.safetensors").exists():
        raise SinkscopeError(f"the shipped model is missing from {path}; reinstall sinkscope")
    with _quiet():
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model.config._name_or_path = TINY_DIR_NAME
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, tokenizer, TINY_DIR_NAME))


def tiny_sinks() -> dict[str, Any]:
    """The shipped model's sink figures as written by scripts/train_tiny.py (sinks.json)."""
    return json.loads((tiny_dir() / "sinks.json").read_text())
