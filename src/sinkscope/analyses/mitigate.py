"""Remove sinks from attention: detect-mask-renormalise (seed 000 Algorithm 1) and eq. (1) renormalisation.

`aggregate_rows` turns one query's per-head attention rows into the distribution the row detectors read
(seed 000 §4.1: last token, last layer, mean over heads); `detect_mask_renormalise` flags sinks with any
registered detector, zeroes them and renormalises what is left into a sink-free distribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sinkscope.detect import ArgumentError, detect, get_detector, list_detectors

__all__ = ["DMRResult", "aggregate_rows", "detect_mask_renormalise", "renormalise"]


@dataclass(frozen=True)
class DMRResult:
    """The output of `detect_mask_renormalise`.

    b: float [..., key], the sink-free distribution: 0 at sinks and invalid keys, sums to 1 over valid keys
    sinks: bool [..., key], the keys the detector flagged
    method: the detector's registry name
    params: the parameters the detector ran with, defaults included
    """

    b: torch.Tensor
    sinks: torch.Tensor
    method: str
    params: Mapping[str, object]


def _broadcast_mask(name: str, mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """`mask` broadcast to `shape` (all True when None); ArgumentError unless it is bool and broadcasts.

    mask: bool broadcastable to shape -> bool [shape]
    """
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    if mask.dtype != torch.bool:
        raise ArgumentError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    try:
        return torch.broadcast_to(mask, shape)
    except RuntimeError:
        raise ArgumentError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the attention's shape {tuple(shape)}"
        ) from None


def renormalise(a: torch.Tensor, keep: torch.Tensor, dim: int = -1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the keys not kept and rescale the rest to sum to 1: b = (a·keep) / Σ_k (a·keep)_k along `dim`.

    This is the renormalisation of seed 000 Algorithm 1 (line 22, b = ã / Σ_j ã_j) and of eq. (1) in §5.1,
    A'_ij = A_ij / Σ_k A_ik with k over the kept keys; for a [query, key] matrix it rescales each row. Keys
    outside `valid` are never kept. Where nothing keeps any mass (every valid key with a_i > 0 masked) the
    vector is returned renormalised over its valid keys instead, i.e. unchanged for a distribution, so the
    output never holds NaN; a vector with no mass on its valid keys comes back as zeros.

    a: float [..., key, ...], keep and valid: bool broadcastable to a -> b: a's shape, dtype at least float32
    """
    x = a.to(torch.promote_types(a.dtype, torch.float32))
    valid = _broadcast_mask("valid", valid, a.shape).to(a.device)
    keep = _broadcast_mask("keep", keep, a.shape)
    kept = torch.where(keep & valid, x, 0)
    kept_total = kept.sum(dim, keepdim=True)
    fallback = torch.where(valid, x, 0)
    has_kept = kept_total > 0
    numerator = torch.where(has_kept, kept, fallback)
    total = torch.where(has_kept, kept_total, fallback.sum(dim, keepdim=True))
    return numerator / torch.where(total > 0, total, 1)


def detect_mask_renormalise(
    a: torch.Tensor,
    method: str = "zscore",
    valid: torch.Tensor | None = None,
    detect_on: torch.Tensor | None = None,
    **params: object,
) -> DMRResult:
    """Seed 000 Algorithm 1: flag sinks with detector `method`, set ã_i = 0 at sinks, return b = ã / Σ_j ã_j.

    The paper's methods are "entropy_delta" (|ΔH_i| > τ) and "zscore" (z_i > α); any registered detector that
    returns a mask works. Row detectors read `a` itself. For a column detector pass the column mass α as
    `detect_on` (its mask must broadcast to a, e.g. α [key] for a [key], or per-head α [layer, head, key] for
    per-head rows); without `detect_on` the detector thresholds a. `params` override the detector's defaults
    and are checked as in `detect`. Renormalisation follows `renormalise`: if every key with mass is a sink, b
    is a renormalised over its valid keys.

    a: float [..., key]; valid: bool broadcastable to a (and to detect_on); detect_on: [..., key] ->
    DMRResult with b [..., key] (sums to 1 over valid keys) and sinks bool [..., key]
    """
    detector = get_detector(method)
    if detector.returns != "mask":
        masks = ", ".join(name for name in list_detectors() if get_detector(name).returns == "mask")
        raise ArgumentError(f"{method} returns a {detector.returns}, not a sink mask; use one of: {masks}")
    sinks = detect(method, a if detect_on is None else detect_on, valid=valid, **params)
    sinks = _broadcast_mask("the sink mask of detect_on", sinks, a.shape).contiguous()
    b = renormalise(a, ~sinks, valid=valid)
    return DMRResult(b=b, sinks=sinks, method=method, params={**detector.params, **params})


def _indices(selection: int | Sequence[int] | None, size: int, what: str, default: list[int]) -> list[int]:
    """A layer/head selection (int or sequence, negative allowed) as distinct indices in [0, size)."""
    if selection is None:
        return default
    chosen = [selection] if isinstance(selection, int) else list(selection)
    if not chosen:
        raise ArgumentError(f"{what} selection is empty; give at least one index in [{-size}, {size})")
    out_of_range = [i for i in chosen if not -size <= i < size]
    if out_of_range:
        raise ArgumentError(f"{what} index {out_of_range[0]} out of range; {what}s are [{-size}, {size})")
    resolved = [i % size for i in chosen]
    if len(set(resolved)) != len(resolved):
        raise ArgumentError(f"{what} selection {chosen} repeats an index; each {what} may appear once")
    return resolved


def aggregate_rows(
    rows: torch.Tensor,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    reduce: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Select layers and heads of one query's attention rows and average: a_i = mean_{l,h} A^{(l,h)}_{n,i}.

    Defaults follow seed 000 §4.1 (a_i = (1/H) Σ_h A^{(L,h)}_{n,i}): the last layer only and all heads.
    `layers` and `heads` take an int or a sequence of ints (a list, a range; negative counts from the end).
    reduce="mean" averages the selected (layer, head) rows, each with equal weight; reduce="none" keeps them
    for per-head detect-mask-renormalise. The mean of distributions is a distribution.

    rows: [..., layer, head, key] -> reduce="mean": [..., key]; "none": [..., layer_sel, head_sel, key]
    """
    if rows.ndim < 3:
        raise ArgumentError(f"rows must have shape [..., layer, head, key], got {tuple(rows.shape)}")
    if reduce not in ("mean", "none"):
        raise ArgumentError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    n_layers, n_heads = rows.shape[-3], rows.shape[-2]
    layer_idx = _indices(layers, n_layers, "layer", [n_layers - 1])
    head_idx = _indices(heads, n_heads, "head", list(range(n_heads)))
    selected = rows.index_select(-3, torch.tensor(layer_idx, device=rows.device))
    selected = selected.index_select(-2, torch.tensor(head_idx, device=rows.device))
    return selected.mean(dim=(-3, -2)) if reduce == "mean" else selected
