"""Interventions on attention inside the forward pass: sink masking, ACT calibration, temperature and reweighting
(of fixed key positions, or of the sinks a row detector flags).

Each intervention is a hook on the registered sinkscope attention function (the same code path as capture): it
receives a layer's attention probabilities A [batch, head, query, key] and returns changed ones, and the layer's
output becomes A·V. Interventions are scoped to layers and heads, compose (applied in order), and run around any
forward or `generate` call:

    with intervene(model, MaskKeys([0], layers=[3, 4]), Calibrate(beta=0.4)):
        model(**inputs)

Rows keep their total mass (1, or 1 − the learned sink share for gpt-oss style models) when mass is moved.

A prompt's attention under interventions is computed a chunk of queries at a time: without a capture session by
`chunked_attention` (a chunk about the size of the layer's output), within one by the capture's own chunks
(`capture.attention._statistics`, each changed chunk reduced to the statistics and the output at once). A never exists
as a whole [b, h, q, k] tensor. ACT's calibration, which needs each key's column mean over every query, reads it in a
first pass over the chunks (`hook_column_means`, shared by both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import transformers

from sinkscope.capture.attention import (
    _HOOKS,
    _hook_chunks,
    _hooked,
    _weighted_values,
    _Workspace,
    chunk_size_for,
    use_sinkscope_attention,
)
from sinkscope.detect import act as act_detector
from sinkscope.detect import detect, get_detector
from sinkscope.errors import SinkscopeError


@dataclass
class Intervention:
    """Base: scope (layers, heads; None = all) and the row-wise change in `change`."""

    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    # True when `change` needs each key's column mean over all the prompt's queries (passed as `alpha`)
    needs_columns: ClassVar[bool] = False

    def applies(self, layer: int | None) -> bool:
        return self.layers is None or (layer is not None and layer in self.layers)

    def __call__(self, probs: torch.Tensor, layer: int | None, bias: torch.Tensor,
                 alpha: torch.Tensor | None = None) -> torch.Tensor:
        """probs [b, h, q, k] (all the layer's queries, or a chunk of them), bias [b|1, 1|h, q, k] (−inf where a key
        is invisible), alpha [b, h, k] the column means over all queries (hooks with `needs_columns`, for a chunk)
        → probs [b, h, q, k]."""
        visible = torch.isfinite(bias)
        if self.needs_columns:
            changed = self.change(probs, layer, visible, alpha)
        else:
            changed = self.change(probs, layer, visible)
        if self.heads is None:
            return changed
        picked = torch.zeros(probs.shape[1], dtype=torch.bool, device=probs.device)
        picked[list(self.heads)] = True
        return torch.where(picked[None, :, None, None], changed, probs)

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_scale(self, layer: int | None, n_heads: int) -> torch.Tensor | None:
        """[h] factors c_h when this intervention only scales whole heads (A_h ← c_h·A_h): then it runs inside the
        chunked statistics without a [query, key] matrix. None (the default): it needs the probabilities."""
        return None


def _rescale_rows(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A'_ij = A_ij w_ij · (Σ_k A_ik) / (Σ_k A_ik w_ik): seed 000 eq. (1) with the row's total mass kept.
    A row whose weighted mass is zero (every key removed) is left unchanged."""
    weighted = probs * weights
    total, new_total = probs.sum(-1, keepdim=True), weighted.sum(-1, keepdim=True)
    if probs.requires_grad:  # autograd needs the intermediate tensors
        return torch.where(new_total > 0, weighted * total / new_total.clamp(min=1e-30), probs)
    weighted.mul_(total).div_(new_total.clamp(min=1e-30))  # in place: one [b, h, q, k] buffer instead of four
    return torch.where(new_total > 0, weighted, probs, out=weighted)


def _key_positions(positions: Sequence[int], nk: int, device: torch.device) -> torch.Tensor:
    """Bool [k] at the given key positions (negative counts from the end); out-of-range positions are ignored."""
    mask = torch.zeros(nk, dtype=torch.bool, device=device)
    idx = [p % nk for p in positions if -nk <= p < nk]
    mask[idx] = True
    return mask


@dataclass
class MaskKeys(Intervention):
    """Remove attention to the given key positions and renormalise the rows (seed 000's causal test).

    positions: absolute key indices (with right padding, prompt positions; negative counts from the end).
    """

    positions: Sequence[int] = (0,)

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor) -> torch.Tensor:
        drop = _key_positions(self.positions, probs.shape[-1], probs.device)
        return _rescale_rows(probs, (~drop).to(probs.dtype)[None, None, None, :])


@dataclass
class MaskKeyPerRow(Intervention):
    """Remove attention to one key per batch row and renormalise: row b loses key keys[b] in every query.

    keys: one absolute key position per batch row (the batch size must equal len(keys)).
    A'_ij = A_ij w_j · (Σ_k A_ik) / (Σ_k A_ik w_k) with w_j = [j ≠ keys[b]]; a row left with no mass is unchanged.
    """

    keys: Sequence[int] = field(default_factory=tuple)

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor) -> torch.Tensor:
        """probs [b, h, q, k] → [b, h, q, k]."""
        keys = torch.as_tensor(list(self.keys), device=probs.device)
        if keys.numel() != probs.shape[0]:
            raise SinkscopeError(f"MaskKeyPerRow has {keys.numel()} keys for a batch of {probs.shape[0]}")
        keep = (torch.arange(probs.shape[-1], device=probs.device)[None, :] != keys[:, None]).to(probs.dtype)
        return _rescale_rows(probs, keep[:, None, None, :])


@dataclass
class Reweight(Intervention):
    """Multiply attention to key k by w_k and renormalise (seed 000 eq. 1 in the forward pass).

    weights: [k] for the first k keys; keys beyond it keep weight 1.
    """

    weights: Sequence[float] | torch.Tensor = ()

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor) -> torch.Tensor:
        nk = probs.shape[-1]
        w = torch.ones(nk, device=probs.device, dtype=probs.dtype)
        given = torch.as_tensor(self.weights, dtype=probs.dtype, device=probs.device)[:nk]
        if bool((given < 0).any()):
            raise SinkscopeError("reweighting weights must be non-negative")
        w[: given.numel()] = given
        return _rescale_rows(probs, w[None, None, None, :])


@dataclass
class ReweightSinks(Intervention):
    """Seed 000 eq. (1) in the forward pass: weight the keys a row detector flags in each attention row by γ and
    renormalise, A'_ij = A_ij w_ij · (Σ_k A_ik) / (Σ_k A_ik w_ik) with w_ij = γ at sinks of row i, 1 elsewhere.

    method: a registered row detector that returns a mask (default zscore: z_j > α = 2 over the keys row i sees,
    seed 000 §4.4); params: its thresholds. γ = 0 is detect-mask-renormalise (Algorithm 1) on every row of every
    scoped head inside the forward pass; γ = 1 is the identity.
    """

    gamma: float = 0.4
    method: str = "zscore"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.gamma >= 0:
            raise SinkscopeError("the reweighting γ must be non-negative")
        detector = get_detector(self.method)
        if detector.statistic != "row" or detector.returns != "mask":
            raise SinkscopeError(f"{self.method} is not a row detector that returns a sink mask")
        detect(self.method, torch.tensor([0.6, 0.3, 0.1]), **self.params)  # checks the thresholds

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor) -> torch.Tensor:
        sinks = detect(self.method, probs, valid=visible, **self.params)  # [b, h, q, k]
        return _rescale_rows(probs, torch.where(sinks, self.gamma, 1.0).to(probs.dtype))


@dataclass
class AblateHeads(Intervention):
    """Zero the output of the selected heads in the selected layers (seed 001 Fig. 5): A_h ← 0, so o_h = A_h V_h = 0
    before the output projection — exactly what zeroing that head's slice of the projection's input does.

    layers/heads: the scope (None = all). Example: ``AblateHeads(layers=[0], heads=[3])``.
    """

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(probs)

    def head_scale(self, layer: int | None, n_heads: int) -> torch.Tensor | None:
        scale = torch.ones(n_heads)
        scale[list(range(n_heads)) if self.heads is None else list(self.heads)] = 0.0
        return scale


@dataclass
class Temperature(Intervention):
    """Sharpen (t < 1) or flatten (t > 1) each row: softmax(s/t) = A^{1/t} / Σ A^{1/t} over the visible keys."""

    t: float = 1.0

    def __post_init__(self) -> None:
        if not self.t > 0:
            raise SinkscopeError("temperature must be positive")

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor) -> torch.Tensor:
        powered = torch.where(probs > 0, probs.clamp(min=1e-30) ** (1.0 / self.t), torch.zeros_like(probs))
        return _rescale_rows(probs, torch.where(probs > 0, powered / probs.clamp(min=1e-30), 0.0))


@dataclass
class Calibrate(Intervention):
    """ACT attention calibration (Yu et al. 2024, their released code).

    Sinks S of a head are the keys whose causal column mean α_k = mean_{i ≥ k, i sees k} A_ik exceeds `threshold`
    (0.1), the first such key (normally BOS) excluded. Then A[:, S] *= β (0.4) and the removed mass
    (1 − β)·Σ_{s∈S} A_is goes to the other keys in proportion to their weights. Sinks are found on the prompt
    (the first call of a layer with more than one query) and reused for later generation steps. Padded queries
    count in no column mean, so a prompt's sinks do not depend on the batch it is padded into.
    """

    beta: float = 0.4
    threshold: float = 0.1
    _sinks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)
    needs_columns: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.beta <= 1:
            raise SinkscopeError("ACT's beta must be in [0, 1]")

    def sinks(self, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Bool [b, h, k]: ACT's hidden sinks from the column means of probs [b, h, q, k] over the real queries.

        A padded position is a key no query sees; query i sits at key i + (k − q) (the cache holds k − q keys).
        """
        nq, nk = probs.shape[-2], probs.shape[-1]
        real = visible.any(1).any(-2)[:, nk - nq :].expand(probs.shape[0], nq)  # [b, q]
        total, count = column_sums(probs, visible, real)
        return act_detector(total / count[:, None].clamp(min=1), threshold=self.threshold)

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor,
               alpha: torch.Tensor | None = None) -> torch.Tensor:
        nq, nk = probs.shape[-2], probs.shape[-1]
        if alpha is not None:  # a chunk of the prompt's queries, with the column means of all of them
            self._sinks[layer] = act_detector(alpha, threshold=self.threshold)
        elif nq > 1 or layer not in self._sinks:
            self._sinks[layer] = self.sinks(probs, visible)
        sinks = self._sinks[layer]
        if sinks.shape[-1] < nk:  # generation: keys added after the prompt are never sinks
            sinks = torch.nn.functional.pad(sinks, (0, nk - sinks.shape[-1]), value=False)
        sinks = sinks[..., :nk][:, :, None, :]  # [b, h, 1, k]
        scaled = torch.where(sinks, probs * self.beta, probs)
        removed = (probs - scaled).sum(-1, keepdim=True)
        rest = torch.where(sinks, 0.0, probs)
        rest_total = rest.sum(-1, keepdim=True)
        if probs.requires_grad:  # autograd needs the intermediate tensors
            return torch.where(rest_total > 0, scaled + rest * removed / rest_total.clamp(min=1e-30), probs)
        scaled.add_(rest.mul_(removed).div_(rest_total.clamp(min=1e-30)))  # in place: fewer [b, h, q, k] buffers
        return torch.where(rest_total > 0, scaled, probs, out=scaled)


def column_sums(probs: torch.Tensor, visible: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over the real queries of A_ik and of [query i sees key k]: probs [b, h, q, k], visible [b|1, 1|h, q, k] bool,
    real [b, q] bool → ([b, h, k], [b, k]). Their ratio is the causal column mean α_k; sums of chunks add up."""
    seen = (visible.any(1) & real[:, :, None]).to(probs.dtype)  # [b, q, k]
    return (probs * real[:, None, :, None].to(probs.dtype)).sum(-2), seen.sum(-2)


def real_queries(mask: torch.Tensor | None, b: int, nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """[b, q] bool: the queries ACT's column means count. A padded position is a key no query sees (without a mask,
    every query is real); query i sits at key i + (k − q)."""
    if mask is None:
        return torch.ones(b, nq, dtype=torch.bool, device=device)
    seen = mask.any(-2) if mask.dtype == torch.bool else (mask > torch.finfo(mask.dtype).min / 2).any(-2)
    return seen[:, 0, nk - nq :].expand(b, nq)


def apply_hooks(hooks: Sequence[Any], layer: int | None, probs: torch.Tensor, bias: torch.Tensor,
                alphas: Mapping[int, torch.Tensor], upto: int | None = None) -> torch.Tensor:
    """probs [b, h, c, k] (a chunk of whole rows) after hooks[:upto] in order; hook i gets the column means
    alphas[i] [b, h, k] when it has them (hooks with `needs_columns`, see `hook_column_means`)."""
    for i, hook in enumerate(hooks[:upto]):
        probs = hook(probs, layer, bias, alphas[i]) if i in alphas else hook(probs, layer, bias)
    return probs


def hook_column_means(
    hooks: Sequence[Any],
    layer: int | None,
    chunks: Callable[[], Iterable[tuple[int, torch.Tensor, torch.Tensor]]],
    real: torch.Tensor,  # [b, q] bool, the queries that count (`real_queries`)
) -> dict[int, torch.Tensor]:
    """hook index → [b, h, k] the column means of what that hook receives (the attention after the hooks before it),
    for each hook with `needs_columns` (ACT), from a pass over the chunks per such hook: the numbers the hook would
    compute over the whole [b, h, q, k] matrix. `chunks()` yields (c0, probs [b, h, c, k] before any hook, bias
    [b|1, 1|h, c, k] with −inf at invisible keys) for the query chunks in order."""
    alphas: dict[int, torch.Tensor] = {}
    for i, hook in enumerate(hooks):
        if not getattr(hook, "needs_columns", False):
            continue
        total = count = None
        for c0, probs, bias in chunks():
            probs = apply_hooks(hooks, layer, probs, bias, alphas, i)
            add_total, add_count = column_sums(probs, torch.isfinite(bias), real[:, c0 : c0 + probs.shape[2]])
            total = add_total if total is None else total + add_total
            count = add_count if count is None else count + add_count
        assert total is not None and count is not None
        alphas[i] = total / count[:, None].clamp(min=1)
    return alphas


def chunked_attention(
    hooks: Sequence[Intervention],
    layer: int | None,
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kvh, k, d]
    value: torch.Tensor,  # [b, kvh, k, dv]
    mask: torch.Tensor | None,  # [b|1, 1, q|1, k] bool or additive float, or None (causal or full, by is_causal)
    is_causal: bool,
    scaling: float,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,  # [h] learned sink logits
    position_bias: torch.Tensor | None = None,  # [b|1, h, q, k]
    chunk: int | None = None,
) -> torch.Tensor:
    """The layer's attention output under `hooks`, `chunk` queries at a time (default: as many as keep a chunk's
    probabilities [b, h, c, k] about the size of the output [b, q, h, dv], at least 16). A hook that needs the column
    means (ACT) gets those of what it receives (the attention after the hooks before it) from a pass over the chunks
    of its own (`hook_column_means`); the same numbers as changing the whole [b, h, q, k] matrix at once. Returns
    [b, q, h, dv] in float32."""
    b, h, nq, _ = query.shape
    nk, dv = key.shape[2], value.shape[-1]
    if chunk is None:
        chunk = max(16, min(chunk_size_for(b, h, nk, query.device, group=h // key.shape[1]), nq * dv // max(1, nk)))
    keys = key.float().contiguous()
    chunking = {"is_causal": is_causal, "scaling": scaling, "softcap": softcap, "s_aux": s_aux,
                "workspace": _Workspace()}
    alphas = _hooked(hooks, layer, query, keys, mask, position_bias, chunk, **chunking).alphas  # as in a capture
    out = torch.empty(b, nq, h, dv, device=query.device)
    for c0, probs, bias in _hook_chunks(query, keys, mask, position_bias, chunk, **chunking):
        out[:, c0 : c0 + chunk] = _weighted_values(apply_hooks(hooks, layer, probs, bias, alphas), value)
    return out


def _check_scope(model: transformers.PreTrainedModel, interventions: Sequence[Intervention]) -> None:
    """Layers and heads an intervention names must exist in the model (one line naming the valid range)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    n_heads = getattr(config, "num_attention_heads", None)
    for iv in interventions:
        name = type(iv).__name__
        if n_layers is not None and iv.layers is not None:
            bad = [layer for layer in iv.layers if not 0 <= layer < n_layers]
            if bad:
                raise SinkscopeError(f"{name}: layers {bad} do not exist; the model has layers 0-{n_layers - 1}")
        if n_heads is not None and iv.heads is not None:
            bad = [head for head in iv.heads if not 0 <= head < n_heads]
            if bad:
                raise SinkscopeError(f"{name}: heads {bad} do not exist; the model has heads 0-{n_heads - 1}")


@contextmanager
def intervene(model: transformers.PreTrainedModel, *interventions: Intervention) -> Iterator[None]:
    """Apply interventions to every forward pass of `model` inside the block (nested blocks compose)."""
    if not interventions:
        raise SinkscopeError("no intervention given")
    _check_scope(model, interventions)
    with use_sinkscope_attention(model):
        token = _HOOKS.set((*_HOOKS.get(), *interventions))
        try:
            yield
        finally:
            _HOOKS.reset(token)
