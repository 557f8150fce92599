"""Sink-aware KV-cache quantisation (issue #18 item 3; the survey's utilisation branch): the perplexity of a text when
the KV cache is fake-quantised, with every token quantised, with the detected sink tokens kept in full precision
(KVSink 2025, PrefixQuant 2024), or with the first k tokens kept — through the full cache and through StreamingLLM's
sink + window cache.

Quantisation follows KIVI (Liu et al. 2024, §3): asymmetric min-max with b bits, x̂ = s·round((x − m)/s) + m,
s = (max − min)/(2^b − 1), m = min,

- keys per channel: the statistics of each channel are taken over a group of `group` consecutive tokens (KIVI's G);
  a group is quantised once it is complete, and the newest keys of an incomplete group wait in full precision
  (KIVI's residual);
- values per token: the statistics of each token (per head) are taken over its channels; a value is quantised as it
  enters the cache.

A kept position is stored in full precision and left out of its group's min and max, as an outlier token stored
aside (PrefixQuant): so keeping a sink also narrows its key group's range. b ≥ 16 means no quantisation (the
baseline).

Scoring is teacher-forced next-token NLL, fed `chunk` tokens at a time through a cache (`FakeQuantCache`) that
returns, for the attention of a chunk, the cache as stored (fake-quantised) followed by the chunk's own keys and values
exactly, and stores the chunk quantised afterwards. So a token's quantised key or value is read only by later chunks,
as in real KV quantisation: `chunk=1` is token-by-token decoding; a chunk of c tokens is a chunked prefill whose
tokens see up to c − 1 predecessors in full precision (KIVI keeps up to R = 128 recent tokens in full precision).
All conditions of one cache run as one batch, one row per condition.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress

FULL_PRECISION = 16  # bits ≥ this: the cache is not quantised (the baseline)
KEEP_POLICIES = ("none", "sinks", "first")
CACHES = ("full", "sink_window")
SINK_SHARE = 0.1
"""A position is a detected sink token when the detector flags it in at least this share of the layer × head pairs
(sinkscope's choice: a key that a tenth of the heads dump attention on)."""


# ------------------------------------------------------------------------------------------------ the quantisers
def _levels(bits: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """2^b − 1 per batch row ([batch] float32); 0 marks a row that stays in full precision (b ≥ 16)."""
    b = torch.as_tensor(bits, device=device).reshape(-1).expand(batch).to(torch.float64)
    if bool((b < 1).any()) or bool((b != b.round()).any()):
        raise SinkscopeError("bits must be whole numbers ≥ 1 (16 or more means no quantisation)")
    return torch.where(b >= FULL_PRECISION, 0.0, 2.0**b - 1).float()


def _keep_rows(keep: torch.Tensor | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """The kept mask as [batch, n] bool (none kept when None; a [n] mask is shared by every row)."""
    if keep is None:
        return torch.zeros(batch, n, dtype=torch.bool, device=device)
    return keep.to(device=device, dtype=torch.bool).reshape(-1, n).expand(batch, n)


def _minmax(x: torch.Tensor, levels: torch.Tensor, use: torch.Tensor, dim: int) -> torch.Tensor:
    """Asymmetric min-max fake quantisation of x along `dim`, statistics over the entries where `use` is True.

    x: float32, levels and use broadcastable to x. Returns s·round((x − m)/s) + m with m, M the min and max of the
    used entries and s = (M − m)/levels (x itself where s = 0: a constant group is exact).
    """
    lo = torch.where(use, x, torch.inf).amin(dim, keepdim=True)
    hi = torch.where(use, x, -torch.inf).amax(dim, keepdim=True)
    scale = (hi - lo) / levels.clamp(min=1)
    ok = torch.isfinite(scale) & (scale > 0)
    step = torch.where(ok, scale, 1.0)
    q = torch.clamp(torch.round((x - lo) / step), min=torch.zeros_like(levels), max=levels)
    return torch.where(ok, q * step + lo, x)


def quantize_keys(k: torch.Tensor, bits: int | torch.Tensor, group: int = 32,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """KIVI's key quantisation: per channel, asymmetric min-max over groups of `group` consecutive tokens.

    k: [batch, head, token, channel]; bits: an int or [batch] (one per row; ≥ 16 leaves the row as it is);
    keep: bool [token] or [batch, token], positions stored in full precision and left out of their group's min and
    max. Tokens are grouped from the first: [0, G), [G, 2G), ...; a last partial group is quantised over its own tokens.
    Returns the dequantised keys, same shape and dtype.
    """
    if group < 1:
        raise SinkscopeError("the key group size must be ≥ 1")
    b, h, n, d = k.shape
    levels = _levels(bits, b, k.device)  # [b]
    kept = _keep_rows(keep, b, n, k.device)  # [b, n]
    pad = -n % group
    x = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).reshape(b, h, -1, group, d)  # [b, h, groups, G, d]
    real = torch.arange(n + pad, device=k.device) < n
    use = torch.nn.functional.pad(~kept, (0, pad)) & real  # [b, n + pad]
    use = use.reshape(b, 1, -1, group, 1)
    out = _minmax(x, levels[:, None, None, None, None], use, dim=3).reshape(b, h, n + pad, d)[:, :, :n]
    stay = kept[:, None, :, None] | (levels == 0)[:, None, None, None]  # [b, 1, n, 1]
    return torch.where(stay, k.float(), out).to(k.dtype)


def quantize_values(v: torch.Tensor, bits: int | torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """KIVI's value quantisation: per token (and head), asymmetric min-max over the channels.

    v: [batch, head, token, channel]; bits: an int or [batch] (≥ 16 leaves the row as it is); keep: bool [token] or
    [batch, token], positions left in full precision. Returns the dequantised values, same shape and dtype.
    """
    b, _, n, _ = v.shape
    levels = _levels(bits, b, v.device)
    kept = _keep_rows(keep, b, n, v.device)
    x = v.float()
    out = _minmax(x, levels[:, None, None, None], torch.ones_like(x, dtype=torch.bool), dim=3)
    stay = kept[:, None, :, None] | (levels == 0)[:, None, None, None]
    return torch.where(stay, x, out).to(v.dtype)


# ------------------------------------------------------------------------------------------------ the cache
class FakeQuantLayer(DynamicLayer):
    """One layer of `FakeQuantCache`: stores keys and values fake-quantised (module docstring), one setting per batch
    row. `bits`: [batch]; `keep`: [batch, n_text] bool over text positions; `group`: KIVI's key group size.

    Entries are appended in text order; `pending` trailing keys wait in full precision for their group to complete.
    Evicting older entries (the sink + window cache) leaves the pending tail alone as long as the window holds at least
    a group.
    """

    def __init__(self, bits: torch.Tensor, keep: torch.Tensor, group: int) -> None:
        super().__init__()
        self.bits, self.keep, self.group = bits, keep, group
        self.seen = 0  # tokens fed so far: the text position of the next entry
        self.pending = 0  # trailing keys not yet quantised

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [batch, kv_head, new, head_dim]. Returns the keys and values this forward attends
        to: the cache as stored, then the new entries exactly; stores the new entries quantised."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        start, self.seen = self.seen, self.seen + new
        if self.seen > self.keep.shape[1]:
            raise SinkscopeError(f"the cache was made for {self.keep.shape[1]} tokens and was fed {self.seen}")
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.values = torch.cat([self.values, quantize_values(value_states, self.bits, self.keep[:, start:self.seen])],
                                dim=-2)
        self.pending += new
        stored = keys
        if self.pending >= self.group:
            m = self.pending - self.pending % self.group  # whole groups, oldest first
            a = keys.shape[-2] - self.pending  # cache index of the first pending key
            first = self.seen - self.pending  # its text position
            block = quantize_keys(keys[:, :, a : a + m], self.bits, self.group, self.keep[:, first : first + m])
            stored = torch.cat([keys[:, :, :a], block, keys[:, :, a + m :]], dim=-2)
            self.pending -= m
        self.keys = stored
        return keys, values


class FakeQuantCache(DynamicCache):
    """A `DynamicCache` whose layers store fake-quantised keys and values (`FakeQuantLayer`): it is the cache, not
    attention, that changes. bits: [batch]; keep: [batch, n_text] bool."""

    def __init__(self, config: Any, bits: torch.Tensor, keep: torch.Tensor, group: int = 32) -> None:
        super().__init__(config=config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):
            raise SinkscopeError("KV quantisation supports models whose layers all use full attention (no sliding "
                                 "window or linear-attention layers)")
        self.layers = [FakeQuantLayer(bits, keep, group) for _ in self.layers]


# ------------------------------------------------------------------------------------------------ the conditions
@dataclass(frozen=True)
class Condition:
    """One row of the batch: quantise to `bits` (≥ 16: not at all), keeping `kept` text positions in full precision
    (`keep` names the policy: none, sinks, first)."""

    bits: int
    keep: str
    kept: tuple[int, ...] = ()


def conditions(bits: Sequence[int], sinks: Sequence[int], keep_first: int) -> list[Condition]:
    """The baseline (16 bits) and, for each b in `bits`, the three keep policies."""
    out = [Condition(FULL_PRECISION, "none")]
    for b in bits:
        if b >= FULL_PRECISION:
            continue
        out += [Condition(b, "none"), Condition(b, "sinks", tuple(sinks)),
                Condition(b, "first", tuple(range(keep_first)))]
    return out


def sink_positions(loaded: LoadedModel, ids: Sequence[int], prefix: int = 256, method: str = "column_mass",
                   share: float = SINK_SHARE) -> pd.DataFrame:
    """Detected sink tokens of the text's first `prefix` tokens (as a prefill would see them): positions the detector
    flags in at least `share` of the layer × head pairs.

    One capture (`run_capture`) of the prefix and `profile.sink_mask` with the default detector. Returns one row per
    detected position: position, token, share (of layer × head pairs that flag it), strongest first."""
    from sinkscope.analyses.profile import sink_mask
    from sinkscope.analyses.stream import context_length
    from sinkscope.capture import CaptureConfig, run_capture

    context = context_length(loaded)
    n = min(prefix, len(ids), context or prefix)
    trace = run_capture(loaded, [list(ids[:n])], CaptureConfig())
    flagged = sink_mask(trace, method)[0].float()  # [L, H, N]
    rate = flagged.mean(dim=(0, 1))  # [N] share of layer × head pairs
    where = torch.nonzero(rate >= share).flatten().tolist()
    rows = [{"position": p, "token": trace.tokens[0][p], "share": float(rate[p])} for p in where]
    return pd.DataFrame(rows, columns=["position", "token", "share"]).sort_values(
        "share", ascending=False, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ the scoring
def kv_quant_nll(loaded: LoadedModel, ids: Sequence[int], conds: Sequence[Condition], cache: str = "full",
                 sink: int = 4, window: int = 256, group: int = 32, chunk: int = 32, progress: Progress | None = None
                 ) -> torch.Tensor:
    """Next-token NLL of `ids` under each condition, through the full cache or StreamingLLM's sink + window cache
    (`analyses.stream`: the first `sink` entries + the last `window`, evicted after each chunk).

    Returns [n_conditions, T − 1]: nll[c, t] = −log p(x_{t+1} | x_≤t) under condition c (the full cache: T is at most
    the model's context). progress: called as progress(cache, done, total) after each chunk (the task is the cache's
    name: "full", "sink_window").
    """
    from sinkscope.analyses.stream import _rotary, _SinkWindowCache, context_length

    if cache not in CACHES:
        raise SinkscopeError(f"unknown cache '{cache}': use one of {', '.join(CACHES)}")
    if chunk < 1 or group < 1:
        raise SinkscopeError("--chunk and --group must be ≥ 1")
    if not conds:
        raise SinkscopeError("no conditions to score")
    context = context_length(loaded)
    ids = list(ids)
    budget = sink + window
    if cache == "full" and context is not None:
        ids = ids[:context]
    if len(ids) < 2:
        raise SinkscopeError("the text is too short: it needs at least two tokens")
    if cache == "sink_window":
        _rotary(loaded)
        if window < group:
            raise SinkscopeError(f"--window {window} is smaller than the key group of {group}: the window must hold a "
                                 "whole group (pass a larger --window or a smaller --group)")
        if context is not None and context < budget + chunk + 1:
            raise SinkscopeError(f"sink + window + chunk = {budget + chunk} does not fit the model's context of "
                                 f"{context} tokens: pass a smaller --window or --chunk")
    model, device, n = loaded.model, loaded.device, len(ids)
    bits = torch.tensor([c.bits for c in conds], device=device)
    keep = torch.zeros(len(conds), n, dtype=torch.bool, device=device)
    for row, c in enumerate(conds):
        keep[row, [p for p in c.kept if 0 <= p < n]] = True
    kv = FakeQuantCache(model.config, bits, keep, group)
    book = _SinkWindowCache(loaded, kv, sink, budget)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = torch.tensor(ids, device=device)
    nll = torch.empty(len(conds), n - 1)
    with torch.inference_mode():
        for t in range(0, n - 1, chunk):
            size = min(chunk, n - 1 - t)  # the last token is only a target
            if cache == "sink_window":
                if context is not None and t + size - 1 - book.offset >= context:
                    book.rebase(t - book.offset - budget)
                if t >= budget:
                    book.place_sinks(t)
            pos = torch.arange(t, t + size, device=device)[None].expand(len(conds), -1) - book.offset
            x = tokens[t : t + size][None].expand(len(conds), -1)
            out = model(input_ids=x, position_ids=pos, use_cache=True, **{cache_arg: kv})
            logp = torch.log_softmax(out.logits.float(), dim=-1)  # [conditions, size, vocab]
            target = tokens[t + 1 : t + 1 + size][None, :, None].expand(len(conds), -1, 1)
            nll[:, t : t + size] = -logp.gather(-1, target)[..., 0].cpu()
            if cache == "sink_window" and kv.get_seq_length() > budget:
                book.evict(kv.get_seq_length() - budget)
            if progress is not None:
                progress(cache, t + size, n - 1)
    return nll


# ------------------------------------------------------------------------------------------------ the analysis
@dataclass
class KVQuantResult:
    """The tables of one run: `kvquant` (one row per cache × bits × keep), `tokens` (per-token NLL, long form) and
    `kept` (the positions each keep policy holds in full precision)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        """A notebook view: the summary or parameters and each table's first rows (`report.notebook`)."""
        from sinkscope.report.notebook import result_html

        return result_html(self)


def kv_quant(loaded: LoadedModel, ids: Sequence[int], bits: Sequence[int] = (8, 4, 2), keep_first: int = 4,
             caches: Sequence[str] = CACHES, sink: int = 4, window: int = 256, group: int = 32, chunk: int = 32,
             prefix: int = 256, method: str = "column_mass", share: float = SINK_SHARE, prompt_id: int = 0,
             progress: Progress | None = None) -> KVQuantResult:
    """Perplexity of `ids` with the KV cache fake-quantised to each of `bits` — all tokens, the detected sinks kept
    (`sink_positions` on the first `prefix` tokens), the first `keep_first` kept — and unquantised, through each cache.

    `progress(cache, done, total)` is called after each chunk, as in `kv_quant_nll`."""
    from sinkscope.analyses.stream import perplexity

    if keep_first < 0:
        raise SinkscopeError("--keep-first must be ≥ 0")
    if not bits:
        raise SinkscopeError("no bit widths: pass e.g. --bits 8,4,2")
    ids = list(ids)
    found = sink_positions(loaded, ids, prefix, method, share)
    conds = conditions(bits, found["position"].tolist(), min(keep_first, len(ids)))
    tokenizer = loaded.tokenizer
    text = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
    rows, token_parts = [], []
    for name in caches:
        nll = kv_quant_nll(loaded, ids, conds, name, sink, window, group, chunk, progress)  # [conditions, T − 1]
        base = perplexity(nll[0])
        for row, c in enumerate(conds):
            ppl = perplexity(nll[row])
            rows.append({"prompt_id": prompt_id, "model": loaded.info.name, "cache": name, "bits": c.bits,
                         "keep": c.keep, "n_kept": len(c.kept), "kept": " ".join(map(str, c.kept)),
                         "n_tokens": nll.shape[1] + 1, "nll": float(nll[row].mean()), "perplexity": ppl,
                         "ppl_ratio": ppl / base})
        m = nll.shape[1]
        token_parts.append(pd.DataFrame({
            "prompt_id": prompt_id,
            "position": np.tile(np.arange(1, m + 1), len(conds)),
            "token": np.tile(np.asarray(text[1 : m + 1], dtype=object), len(conds)),
            "cache": name,
            "bits": np.repeat([c.bits for c in conds], m),
            "keep": np.repeat([c.keep for c in conds], m),
            "nll": nll.numpy().ravel(),
        }))
    kept = [{"prompt_id": prompt_id, "keep": "sinks", "position": int(r.position), "token": r.token,
             "share": float(r.share)} for r in found.itertuples()]
    kept += [{"prompt_id": prompt_id, "keep": "first", "position": p, "token": text[p], "share": np.nan}
             for p in range(min(keep_first, len(ids)))]
    tables = {"kvquant": pd.DataFrame(rows), "tokens": pd.concat(token_parts, ignore_index=True),
              "kept": pd.DataFrame(kept, columns=["prompt_id", "keep", "position", "token", "share"])}
    return KVQuantResult(tables)
