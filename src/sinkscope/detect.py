"""Attention-sink detectors: pure torch functions over the key axis, and a registry that names them.

Every detector reads the last dimension of its input as the key axis and broadcasts over the leading ones,
so a single vector `[key]`, per-head rows `[layer, head, key]` and batches `[batch, layer, head, key]` all
work. The optional `valid` mask (bool, broadcastable to the input) marks the real key positions (not padding,
visible to the query); invalid positions are never sinks and count in no statistic (n, μ, σ, entropy).

Two kinds of input are read:

* "row" detectors (`mean_multiple`, `zscore`, `entropy_delta`) read an attention distribution a over the keys,
  such as the last token's row of the last layer averaged over heads (seed 000, §4.1). They are scale
  invariant: a and c·a (c > 0) have the same sinks.
* "column" detectors (`column_mass`, `sink_rate`, `act`) read the column mass α_k of each key: the mean of
  A_ik over the queries i ≥ k that can see key k, computed per (layer, head) elsewhere.

`detect(name, x, valid, **params)` is the checked entry point: it rejects unknown detectors, unknown
parameters and thresholds outside their allowed range with a one-line `ArgumentError` (a `ValueError`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from types import MappingProxyType
from typing import Literal

import torch

from sinkscope.errors import SinkscopeError

__all__ = [
    "DETECTORS",
    "ArgumentError",
    "Bound",
    "Detector",
    "act",
    "column_mass",
    "detect",
    "entropy",
    "entropy_delta",
    "entropy_delta_scores",
    "get_detector",
    "list_detectors",
    "mean_multiple",
    "register_detector",
    "sink_rate",
    "zscore",
]


class ArgumentError(SinkscopeError, ValueError):
    """A bad detector name, parameter, threshold, shape or index; the one-line message says what is valid."""


# ----------------------------------------------------------------------------------------------------------
# helpers


def _work_dtype(a: torch.Tensor) -> torch.dtype:
    """The dtype statistics are computed in: the input's float dtype, at least float32."""
    return torch.promote_types(a.dtype, torch.float32)


def _valid_mask(a: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """`valid` broadcast to a's shape (all True when None).

    a: [..., key], valid: bool broadcastable to a -> bool [..., key]
    """
    if valid is None:
        return torch.ones(a.shape, dtype=torch.bool, device=a.device)
    if valid.dtype != torch.bool:
        raise ArgumentError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    try:
        return torch.broadcast_to(valid, a.shape)
    except RuntimeError:
        raise ArgumentError(
            f"valid of shape {tuple(valid.shape)} does not broadcast to the input's shape {tuple(a.shape)}"
        ) from None


def _moments(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation over the valid keys (two-pass, 1/n); 0 where no key is valid.

    x, valid: [..., key] -> μ, σ: [..., 1]
    """
    n = valid.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
    mu = torch.where(valid, x, 0).sum(-1, keepdim=True) / n
    var = torch.where(valid, (x - mu) ** 2, 0).sum(-1, keepdim=True) / n
    return mu, var.sqrt()


def _exclusive_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ_{j≠i} x_j along the last dim, as (sum before i) + (sum after i).

    Unlike Σx − x_i this never subtracts, so for same-signed x there is no cancellation even when x_i holds
    nearly all the mass.
    x: [..., key] -> [..., key]
    """
    zero = torch.zeros_like(x[..., :1])
    before = torch.cat([zero, x.cumsum(-1)[..., :-1]], dim=-1)
    after = torch.cat([zero, x.flip(-1).cumsum(-1)[..., :-1]], dim=-1).flip(-1)
    return before + after


def _entropy_from_sums(s: torch.Tensor, s_xlogx: torch.Tensor) -> torch.Tensor:
    """H(x / S) from S = Σx and Σ x log x: H = log S − (Σ x log x)/S; 0 where S = 0 (nothing to normalise).

    s, s_xlogx: same shape -> same shape
    """
    positive = s > 0
    s_safe = torch.where(positive, s, 1)
    return torch.where(positive, s_safe.log() - s_xlogx / s_safe, 0)


# ----------------------------------------------------------------------------------------------------------
# row detectors (read an attention distribution)


def mean_multiple(a: torch.Tensor, theta: float = 5.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-multiple threshold: key i is a sink if a_i > θ·μ, μ = (1/n) Σ_i a_i over the n valid keys.

    For a distribution over n keys μ = 1/n, so θ = 5 flags keys holding over five times their uniform share.
    Source: seed 000 §4.2, after Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks".

    a: [..., key], valid: bool broadcastable to a -> bool [..., key]
    """
    valid = _valid_mask(a, valid)
    x = a.to(_work_dtype(a))
    mu, _ = _moments(x, valid)
    return valid & (x > theta * mu)


def zscore(a: torch.Tensor, alpha: float = 2.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Z-score outliers: key i is a sink if z_i = (a_i − μ)/σ > α.

    μ = (1/n) Σ a_i and σ² = (1/n) Σ (a_i − μ)² (population variance) over the n valid keys. A constant vector
    (σ = 0, e.g. uniform attention) has no sinks; the test is strict, so z_i = α is not a sink.
    Source: seed 000 §4.4 and Algorithm 1 (lines 8-9).

    a: [..., key], valid: bool broadcastable to a -> bool [..., key]
    """
    valid = _valid_mask(a, valid)
    x = a.to(_work_dtype(a))
    if x.shape[-1] == 0:  # no keys: amax below needs at least one
        return valid
    mu, sigma = _moments(x, valid)
    # A constant vector has σ = 0, but μ's rounding can leave σ ~ 1e-8 and z = ±1 noise: test equality.
    high = torch.where(valid, x, -math.inf).amax(-1, keepdim=True)
    low = torch.where(valid, x, math.inf).amin(-1, keepdim=True)
    spread = (sigma > 0) & (high > low)
    z = (x - mu) / torch.where(spread, sigma, 1)
    return valid & spread & (z > alpha)


def entropy(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (natural log) of a normalised along `dim`: H = −Σ_i p_i log p_i, p = a/Σa, 0·log 0 = 0.

    For an attention distribution (Σa = 1) this is seed 000 §4.3's H(a) = −Σ a_i log a_i. An all-zero vector
    has entropy 0.
    Source: seed 000 §4.3.

    a: [..., key, ...] -> [...] (dim removed), dtype at least float32
    """
    x = a.to(_work_dtype(a))
    s = x.sum(dim, keepdim=True)
    p = x / torch.where(s > 0, s, 1)
    return -torch.special.xlogy(p, p).sum(dim)


def entropy_delta_scores(a: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy change from removing each key: ΔH_i = H(a) − H(a^(−i)), natural log; 0 at invalid keys.

    a^(−i) is a with a_i := 0 renormalised (seed 000 §4.3, steps 1-3). No loop over i: with S = Σ_j a_j,
    R_i = Σ_{j≠i} a_j and T_i = Σ_{j≠i} a_j log a_j,
        H(a) = log S − (Σ_j a_j log a_j)/S,    H(a^(−i)) = log R_i − T_i/R_i.
    R_i and T_i are summed from the keys before and after i (never as S − a_i), in float64, so a key that
    holds almost all the mass still gets the entropy of the others. When a_i holds all the mass (R_i = 0) the
    renormalised vector is undefined and its entropy is taken as 0. a is renormalised over the valid keys
    first, so the scores are scale invariant.
    Source: seed 000 §4.3 and Algorithm 1 (line 3).

    a: [..., key], valid: bool broadcastable to a -> ΔH [..., key], dtype at least float32
    """
    valid = _valid_mask(a, valid)
    x = torch.where(valid, a.to(torch.float64), 0)
    x_log_x = torch.special.xlogy(x, x)  # a_j log a_j with 0·log 0 = 0
    h_all = _entropy_from_sums(x.sum(-1, keepdim=True), x_log_x.sum(-1, keepdim=True))
    h_without = _entropy_from_sums(_exclusive_sum(x), _exclusive_sum(x_log_x))
    return torch.where(valid, h_all - h_without, 0).to(_work_dtype(a))


def entropy_delta(a: torch.Tensor, tau: float = 0.1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy-change sinks: key i is a sink if |ΔH_i| > τ, ΔH_i = H(a) − H(a^(−i)).

    ΔH is computed by `entropy_delta_scores`.

    Both signs count: ΔH_i ≫ 0 means i carries the distribution's focus, ΔH_i ≪ 0 that removing it makes the
    rest spikier. Note that removing any key of a uniform vector over n keys changes H by log(n/(n−1)), which
    exceeds τ = 0.1 for n ≤ 10: on short uniform vectors every key is flagged.
    Source: seed 000 §4.3 and Algorithm 1 (lines 3-4).

    a: [..., key], valid: bool broadcastable to a -> bool [..., key]
    """
    valid = _valid_mask(a, valid)
    return valid & (entropy_delta_scores(a, valid).abs() > tau)


# ----------------------------------------------------------------------------------------------------------
# column detectors (read column mass α_k per (layer, head))


def column_mass(alpha: torch.Tensor, eps: float = 0.2, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Column-mass threshold: key k is a sink if α_k > ε, α_k = mean of A_ik over the queries i ≥ k seeing k.

    ε = 0.2 as in seed 003 §3.1 (the "Catch, Tag, Release" paper), after Gu et al. 2025, "When Attention Sink
    Emerges in Language Models".

    alpha: [..., key], valid: bool broadcastable to alpha -> bool [..., key]
    """
    valid = _valid_mask(alpha, valid)
    return valid & (alpha > eps)


def sink_rate(
    alpha: torch.Tensor,
    eps: float = 0.3,
    dims: tuple[int, ...] = (-3, -2),
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sink rate: the fraction of (layer, head) pairs where key k is a sink, (1/LH) Σ_{l,h} 1[α_k^{l,h} > ε].

    α_k^{l,h} is the column mean (1/(T − k)) Σ_{i ≥ k} A_ik^{l,h} with 0-based k, as in Gu et al.'s code.
    `dims` are the axes averaged over (default: layer and head of a [..., layer, head, key] input); they may
    not include the key axis. Pairs where key k is invalid are left out of the fraction; a key valid in no
    pair has rate 0. This returns a rate in [0, 1], not a mask. ε = 0.3 follows Gu et al. 2025, "When
    Attention Sink Emerges in Language Models".

    alpha: [..., layer, head, key], valid: bool broadcastable to alpha -> float [..., key] (`dims` removed)
    """
    valid = _valid_mask(alpha, valid)
    if not dims:
        raise ArgumentError("sink_rate: dims must name at least one axis to average over, e.g. (-3, -2)")
    if any(not -alpha.ndim <= d < alpha.ndim for d in dims):
        raise ArgumentError(f"sink_rate: dims {tuple(dims)} out of range for a {alpha.ndim}-d input")
    axes = sorted({d % alpha.ndim for d in dims})
    if len(axes) != len(dims) or alpha.ndim - 1 in axes:
        raise ArgumentError(f"sink_rate: dims {tuple(dims)} must be distinct axes other than the key axis")
    hits = (valid & (alpha > eps)).sum(axes).to(_work_dtype(alpha))
    pairs = valid.sum(axes).to(hits.dtype)
    return hits / pairs.clamp(min=1)


def act(alpha: torch.Tensor, threshold: float = 0.1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden sinks: key k is a sink if α_k > threshold, except the first such key along the key axis.

    The earliest key over the threshold (normally BOS, the obvious sink) is not reported, leaving the "hidden"
    sinks further into the sequence. Source: Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks"
    (ACT), threshold 0.1 as in their released code.

    alpha: [..., key], valid: bool broadcastable to alpha -> bool [..., key]
    """
    valid = _valid_mask(alpha, valid)
    hits = valid & (alpha > threshold)
    return hits & (hits.cumsum(-1) > 1)


# ----------------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Bound:
    """The allowed values of one threshold: finite, low < x (low_open) or low ≤ x, and x ≤ high."""

    low: float
    high: float = math.inf
    low_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        return math.isfinite(x) and above and x <= self.high

    def __str__(self) -> str:
        left = "(" if self.low_open else "["
        right = ")" if math.isinf(self.high) else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"


@dataclass(frozen=True)
class Detector:
    """A named detector: fn(x, valid=..., **params), what it reads, its default parameters and its source.

    statistic: "row" reads an attention distribution, "column" reads column mass α.
    returns: "mask" (bool, input's shape) or "rate" (float, some axes averaged away).
    bounds: the allowed range of each numeric threshold in `params`.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    statistic: Literal["row", "column"]
    params: Mapping[str, object]
    source: str
    doc: str
    returns: Literal["mask", "rate"] = "mask"
    bounds: Mapping[str, Bound] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views, so no caller can change the registry's defaults.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "bounds", MappingProxyType(dict(self.bounds)))


DETECTORS: dict[str, Detector] = {}


def register_detector(detector: Detector, *, replace: bool = False) -> Detector:
    """Add `detector` to DETECTORS under its name; an existing name needs replace=True."""
    if detector.name in DETECTORS and not replace:
        raise ArgumentError(f"a detector named {detector.name!r} is already registered; pass replace=True")
    DETECTORS[detector.name] = detector
    return detector


def list_detectors() -> list[str]:
    """Registered detector names, sorted."""
    return sorted(DETECTORS)


def get_detector(name: str) -> Detector:
    """The detector registered as `name`; ArgumentError listing the valid names otherwise."""
    try:
        return DETECTORS[name]
    except KeyError:
        valid_names = ", ".join(list_detectors())
        raise ArgumentError(f"unknown detector {name!r}; valid names: {valid_names}") from None


def _check_params(detector: Detector, params: Mapping[str, object]) -> None:
    """Reject parameter names the detector does not take and thresholds outside their bounds."""
    unknown = ", ".join(sorted(set(params) - set(detector.params)))
    if unknown:
        allowed = ", ".join(detector.params)
        raise ArgumentError(f"{detector.name}: unknown parameter(s) {unknown}; allowed: {allowed}")
    for key, value in params.items():
        bound = detector.bounds.get(key)
        if bound is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Real) or float(value) not in bound:
            raise ArgumentError(f"{detector.name}: {key} must be a finite number in {bound}, got {value!r}")


def detect(name: str, x: torch.Tensor, valid: torch.Tensor | None = None, **params: object) -> torch.Tensor:
    """Run detector `name` on x after checking the parameters; unset parameters take the detector's defaults.

    x: [..., key], valid: bool broadcastable to x -> bool mask [..., key], or for returns == "rate" a float
    tensor with the averaged axes removed
    """
    detector = get_detector(name)
    _check_params(detector, params)
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        raise ArgumentError(f"{name}: input must be a tensor of shape [..., key] (at least 1-d)")
    return detector.fn(x, valid=valid, **{**detector.params, **params})


_SOURCE_000 = "seed 000 'Attention Sink Is Sinking Causality'"
_SOURCE_GU = "Gu et al. 2025, 'When Attention Sink Emerges in Language Models'"
_SOURCE_YU = "Yu et al. 2024, 'Unveiling and Harnessing Hidden Attention Sinks'"

_BUILTIN = (
    Detector(
        "mean_multiple",
        mean_multiple,
        "row",
        {"theta": 5.0},
        f"{_SOURCE_000} §4.2, after {_SOURCE_YU}",
        "a_i > θ·μ, μ the mean over valid keys",
        bounds={"theta": Bound(0.0, low_open=True)},
    ),
    Detector(
        "zscore",
        zscore,
        "row",
        {"alpha": 2.0},
        f"{_SOURCE_000} §4.4, Algorithm 1",
        "z_i = (a_i − μ)/σ > α, population σ",
        bounds={"alpha": Bound(0.0)},
    ),
    Detector(
        "entropy_delta",
        entropy_delta,
        "row",
        {"tau": 0.1},
        f"{_SOURCE_000} §4.3, Algorithm 1",
        "|H(a) − H(renormalised a without i)| > τ",
        bounds={"tau": Bound(0.0)},
    ),
    Detector(
        "column_mass",
        column_mass,
        "column",
        {"eps": 0.2},
        f"seed 003 §3.1, after {_SOURCE_GU}",
        "column mean α_k > ε",
        bounds={"eps": Bound(0.0, 1.0)},
    ),
    Detector(
        "sink_rate",
        sink_rate,
        "column",
        {"eps": 0.3, "dims": (-3, -2)},
        _SOURCE_GU,
        "fraction of (layer, head) pairs with α_k > ε",
        returns="rate",
        bounds={"eps": Bound(0.0, 1.0)},
    ),
    Detector(
        "act",
        act,
        "column",
        {"threshold": 0.1},
        f"{_SOURCE_YU} (ACT code)",
        "α_k > threshold, the first such key (normally BOS) excluded",
        bounds={"threshold": Bound(0.0, 1.0)},
    ),
)
for _detector in _BUILTIN:
    register_detector(_detector)
