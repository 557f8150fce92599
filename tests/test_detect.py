"""Detectors: hand-worked examples, batching, `valid` masking, properties, and the registry's checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkscope.detect import (
    DETECTORS,
    ArgumentError,
    Bound,
    Detector,
    act,
    column_mass,
    detect,
    entropy,
    entropy_delta,
    entropy_delta_scores,
    get_detector,
    list_detectors,
    mean_multiple,
    register_detector,
    sink_rate,
    zscore,
)
from sinkscope.errors import SinkscopeError

ROW = ["mean_multiple", "zscore", "entropy_delta"]
MASKS = ["mean_multiple", "zscore", "entropy_delta", "column_mass", "act"]

# One spike among five: μ = 0.2, deviations (0.4, −0.1 ×4), σ² = (0.16 + 4·0.01)/5 = 0.04, σ = 0.2,
# z = (2.0, −0.5, −0.5, −0.5, −0.5).
SPIKE5 = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])

# Hand-built column mass α [layer=2, head=2, key=4].
ALPHA = torch.tensor(
    [
        [[0.50, 0.10, 0.25, 0.05], [0.05, 0.40, 0.15, 0.12]],
        [[0.35, 0.05, 0.30, 0.02], [0.00, 0.08, 0.11, 0.21]],
    ]
)


def _h(p: list[float]) -> float:
    """Entropy of a distribution by hand: −Σ p log p over p > 0."""
    return -sum(x * math.log(x) for x in p if x > 0)


def _reference_delta_h(a: list[float]) -> list[float]:
    """ΔH_i by the definition (seed 000 §4.3): loop over i, build the renormalised vector, take its entropy."""
    total = math.fsum(a)
    h_all = _h([x / total for x in a]) if total > 0 else 0.0
    out = []
    for i in range(len(a)):
        rest = [0.0 if j == i else x for j, x in enumerate(a)]
        mass = math.fsum(rest)
        out.append(h_all - (_h([x / mass for x in rest]) if mass > 0 else 0.0))
    return out


# --------------------------------------------------------------------------------------------------------
# hand-worked examples


def test_mean_multiple_by_hand():
    # μ = 0.2: θ = 2 → 0.6 > 0.4 flags key 0; θ = 5 → 0.6 > 1.0 flags nothing.
    assert mean_multiple(SPIKE5, theta=2.0).tolist() == [True, False, False, False, False]
    assert not mean_multiple(SPIKE5).any()
    # Exact in binary: [6, 1, 1, 1, 1] has μ = 2, so θ = 3 puts key 0 exactly on the line (6 > 6 is false).
    exact = torch.tensor([6.0, 1, 1, 1, 1])
    assert not mean_multiple(exact, theta=3.0).any()
    assert mean_multiple(exact, theta=2.9).tolist() == [True, False, False, False, False]


def test_zscore_by_hand():
    # z_0 = 2.0 (see SPIKE5): α = 1.5 flags it, α = 2.5 does not.
    assert zscore(SPIKE5, alpha=1.5).tolist() == [True, False, False, False, False]
    assert not zscore(SPIKE5, alpha=2.5).any()
    # Strict boundary, exact in binary: [6, 1, 1, 1, 1] has μ = 2, σ² = (16 + 4·1)/5 = 4, z_0 = 4/2 = 2.
    exact = torch.tensor([6.0, 1, 1, 1, 1])
    assert not zscore(exact, alpha=2.0).any()
    assert zscore(exact, alpha=1.99).tolist() == [True, False, False, False, False]


def test_zscore_constant_vector_has_no_sinks_and_no_nan():
    for a in (torch.full((7,), 1 / 7), torch.zeros(4), torch.tensor([0.3])):
        assert not zscore(a, alpha=0.0).any()


def test_entropy_delta_by_hand():
    # H(a) = −0.6 ln 0.6 − 4·0.1 ln 0.1 = 1.2275294
    h = -0.6 * math.log(0.6) - 4 * 0.1 * math.log(0.1)
    # without key 0: (0.25 ×4), H = ln 4 = 1.3862944, ΔH_0 = −0.1587650
    d0 = h - math.log(4)
    # without a 0.1: (0.6, 0.1, 0.1, 0.1)/0.9 = (2/3, 1/9 ×3), H = (2/3) ln 1.5 + (1/3) ln 9 = 1.0027183, ΔH = 0.2248111
    d1 = h - (2 / 3 * math.log(1.5) + 1 / 3 * math.log(9))
    assert d0 == pytest.approx(-0.1587650, abs=1e-6) and d1 == pytest.approx(0.2248111, abs=1e-6)
    torch.testing.assert_close(entropy_delta_scores(SPIKE5), torch.tensor([d0, d1, d1, d1, d1]))
    assert entropy(SPIKE5).item() == pytest.approx(h, abs=1e-6)
    # |ΔH| > τ: τ = 0.1 flags all five (negative ΔH counts), τ = 0.2 only the 0.1s, τ = 0.3 none.
    assert entropy_delta(SPIKE5).tolist() == [True] * 5
    assert entropy_delta(SPIKE5, tau=0.2).tolist() == [False, True, True, True, True]
    assert not entropy_delta(SPIKE5, tau=0.3).any()


def test_entropy_delta_all_mass_on_one_key():
    # a_0 holds all the mass: the vector without it is undefined, its entropy is taken as 0 → ΔH_0 = H(a) − 0 = 0;
    # without key 1 or 2 the vector is still (1, 0, 0), H = 0 → ΔH = 0.
    scores = entropy_delta_scores(torch.tensor([1.0, 0.0, 0.0]))
    assert scores.tolist() == [0.0, 0.0, 0.0]
    # Nearly all the mass: S − a_0 rounds to 0 in float32, but the other two still form (1/2, 1/2), H = ln 2.
    a = torch.tensor([1.0, 1e-8, 1e-8])
    assert entropy_delta_scores(a)[0].item() == pytest.approx(-math.log(2), abs=1e-5)
    assert torch.isfinite(entropy_delta_scores(torch.zeros(3))).all()


def test_column_mass_by_hand():
    # α > 0.2 (seed 003's ε)
    expected = [
        [[True, False, True, False], [False, True, False, False]],
        [[True, False, True, False], [False, False, False, True]],
    ]
    assert column_mass(ALPHA).tolist() == expected


def test_sink_rate_by_hand():
    # α > 0.3 per (layer, head): (0,0) key 0; (0,1) key 1; (1,0) key 0 (0.30 is not > 0.3); (1,1) none.
    # Counts over the 4 pairs: key 0: 2, key 1: 1, keys 2-3: 0.
    rate = sink_rate(ALPHA)
    assert rate.dtype.is_floating_point and rate.shape == (4,)
    torch.testing.assert_close(rate, torch.tensor([0.5, 0.25, 0.0, 0.0]))
    # Over heads only: [layer, key]; layer 0: key 0 (1 of 2), key 1 (1 of 2); layer 1: key 0 (1 of 2).
    torch.testing.assert_close(sink_rate(ALPHA, dims=(-2,)), torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0, 0, 0]]))
    # ε = 0.2 as in column_mass: key 0: 2/4, key 1: 1/4, key 2: 2/4, key 3: 1/4.
    torch.testing.assert_close(sink_rate(ALPHA, eps=0.2), torch.tensor([0.5, 0.25, 0.5, 0.25]))


def test_act_by_hand():
    # α > 0.1 per head, then drop the earliest hit:
    # (0,0) hits keys 0, 2 (0.10 is not > 0.1) → 2;  (0,1) hits 1, 2, 3 → 2, 3;
    # (1,0) hits 0, 2 → 2;                        (1,1) hits 2, 3 → 3.
    expected = [
        [[False, False, True, False], [False, False, True, True]],
        [[False, False, True, False], [False, False, False, True]],
    ]
    assert act(ALPHA).tolist() == expected
    # The first hit is excluded even when it is not key 0, and a lone hit leaves nothing.
    assert act(torch.tensor([0.0, 0.5, 0.2])).tolist() == [False, False, True]
    assert not act(torch.tensor([0.05, 0.5, 0.02])).any()


# --------------------------------------------------------------------------------------------------------
# batching and valid masking


def _dirichlet(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) ** 4  # skewed, so some keys are sinks
    return x / x.sum(-1, keepdim=True)


@pytest.mark.parametrize("name", MASKS)
def test_batched_equals_loop(name):
    a = _dirichlet((2, 3, 4, 9))
    batched = detect(name, a)
    assert batched.shape == a.shape and batched.dtype == torch.bool
    looped = torch.stack([detect(name, v) for v in a.reshape(-1, 9)]).reshape(a.shape)
    assert torch.equal(batched, looped)
    assert batched.any()  # the example exercises the detector


def test_sink_rate_batched_equals_loop():
    alpha = _dirichlet((3, 2, 4, 6), seed=1)
    batched = detect("sink_rate", alpha, eps=0.2)
    assert batched.shape == (3, 6)
    assert torch.equal(batched, torch.stack([sink_rate(x, eps=0.2) for x in alpha]))


def test_entropy_delta_scores_batched_equals_loop():
    a = _dirichlet((3, 5, 7), seed=2)
    looped = torch.stack([entropy_delta_scores(v) for v in a.reshape(-1, 7)]).reshape(a.shape)
    torch.testing.assert_close(entropy_delta_scores(a), looped)


@pytest.mark.parametrize("name", MASKS)
def test_valid_masks_padding(name):
    # 4 real keys, then 3 padding keys holding junk that would be sinks if counted.
    real = torch.tensor([0.55, 0.3, 0.1, 0.05])
    padded = torch.cat([real, torch.tensor([0.9, 0.0, 0.7])])
    valid = torch.tensor([True] * 4 + [False] * 3)
    params = {"theta": 2.0} if name == "mean_multiple" else {}
    mask = detect(name, padded, valid=valid, **params)
    assert not mask[4:].any()
    assert torch.equal(mask[:4], detect(name, real, **params))


def test_valid_broadcasts_over_heads_and_excludes_statistics():
    a = _dirichlet((2, 3, 6), seed=3)
    valid = torch.tensor([True, True, True, True, False, False])  # [key], shared by every head
    for name in ROW:
        torch.testing.assert_close(detect(name, a, valid=valid)[..., :4], detect(name, a[..., :4]))
    torch.testing.assert_close(entropy_delta_scores(a, valid)[..., :4], entropy_delta_scores(a[..., :4]))
    assert (entropy_delta_scores(a, valid)[..., 4:] == 0).all()


def test_sink_rate_leaves_invalid_pairs_out():
    # Key 0 valid only in layer 0: (0,0) 0.50 > 0.3, (0,1) 0.05 is not → 1/2. Key 1: 1/4 as before. Key 3
    # is valid nowhere → 0.
    valid = torch.ones(2, 2, 4, dtype=torch.bool)
    valid[1, :, 0] = False
    valid[:, :, 3] = False
    torch.testing.assert_close(sink_rate(ALPHA, valid=valid), torch.tensor([0.5, 0.25, 0.0, 0.0]))


def test_act_first_hit_counts_valid_keys_only():
    # Key 0 is padding: the first valid hit is key 1, so only key 2 is reported.
    alpha = torch.tensor([0.9, 0.5, 0.2])
    assert act(alpha, valid=torch.tensor([False, True, True])).tolist() == [False, False, True]


def test_row_detectors_are_scale_invariant():
    a = _dirichlet((4, 10), seed=4)
    for name in ROW:
        assert torch.equal(detect(name, a), detect(name, a * 8.0))


# --------------------------------------------------------------------------------------------------------
# properties

_prob = st.floats(min_value=0.0, max_value=1.0, width=32)


@st.composite
def distributions(draw, min_size: int = 2, max_size: int = 64) -> torch.Tensor:
    """A random attention distribution (float32), zeros and near-one-hot vectors included."""
    values = draw(st.lists(_prob, min_size=min_size, max_size=max_size).filter(lambda v: sum(v) > 0))
    a = torch.tensor(values, dtype=torch.float32)
    return a / a.sum()


@settings(deadline=None, max_examples=150)
@given(distributions())
def test_property_row_detectors_well_formed(a):
    for name in MASKS:
        mask = detect(name, a)
        assert mask.dtype == torch.bool and mask.shape == a.shape
    assert torch.isfinite(entropy_delta_scores(a)).all()
    assert torch.isfinite(entropy(a)).all()


@settings(deadline=None, max_examples=150)
@given(st.lists(_prob, min_size=2, max_size=64))
def test_property_entropy_delta_matches_direct_loop(values):
    a = torch.tensor(values, dtype=torch.float32)  # not normalised: ΔH renormalises itself
    reference = torch.tensor(_reference_delta_h([float(x) for x in a]), dtype=torch.float64)
    torch.testing.assert_close(entropy_delta_scores(a).double(), reference, atol=1e-5, rtol=0)


@settings(deadline=None, max_examples=60)
@given(st.integers(min_value=2, max_value=64), st.integers(min_value=0, max_value=5))
def test_property_uniform_has_no_sinks(n, n_pad):
    a = torch.cat([torch.full((n,), 1.0 / n), torch.rand(n_pad)])
    valid = torch.arange(n + n_pad) < n
    for name in ("mean_multiple", "zscore"):
        assert not detect(name, a, valid=valid).any()
    # Removing one of n equal keys changes H by ln(n/(n−1)) (ln 4 − ln 3 for n = 4), which is > τ = 0.1
    # for n ≤ 10: entropy_delta with the default τ flags every key of a short uniform vector.
    delta = math.log(n / (n - 1))
    torch.testing.assert_close(entropy_delta_scores(a, valid)[:n], torch.full((n,), delta), atol=1e-5, rtol=0)
    assert bool(detect("entropy_delta", a, valid=valid).any()) == (delta > 0.1)
    assert not detect("entropy_delta", a, valid=valid, tau=delta + 1e-4).any()


@settings(deadline=None, max_examples=60)
@given(distributions(max_size=16), st.lists(_prob, min_size=1, max_size=8))
def test_property_padding_is_ignored(a, junk):
    padded = torch.cat([a, torch.tensor(junk)])
    valid = torch.arange(len(padded)) < len(a)
    for name in MASKS:
        mask = detect(name, padded, valid=valid)
        assert not mask[len(a) :].any()
        assert torch.equal(mask[: len(a)], detect(name, a))


# --------------------------------------------------------------------------------------------------------
# registry


def test_registry_lists_all_six():
    assert set(list_detectors()) == {"mean_multiple", "zscore", "entropy_delta", "column_mass", "sink_rate", "act"}
    assert list_detectors() == sorted(DETECTORS)
    for name in list_detectors():
        d = get_detector(name)
        assert d.name == name and d.source and d.doc and d.statistic in ("row", "column")
        assert set(d.bounds) <= set(d.params)
    assert {n for n in list_detectors() if get_detector(n).statistic == "row"} == set(ROW)
    assert get_detector("sink_rate").returns == "rate"
    assert all(get_detector(n).returns == "mask" for n in MASKS)
    assert get_detector("column_mass").params["eps"] == 0.2
    with pytest.raises(TypeError):
        get_detector("zscore").params["alpha"] = 3.0  # type: ignore[index]


def test_unknown_detector_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown detector 'zcore'; valid names: act, column_mass") as err:
        get_detector("zcore")
    assert isinstance(err.value, ArgumentError) and isinstance(err.value, SinkscopeError)
    with pytest.raises(ValueError, match="valid names"):
        detect("nope", SPIKE5)


def test_unknown_parameter_names_allowed_ones():
    with pytest.raises(ValueError, match=r"zscore: unknown parameter\(s\) theta; allowed: alpha"):
        detect("zscore", SPIKE5, theta=2.0)
    with pytest.raises(ValueError, match="allowed: eps, dims"):
        detect("sink_rate", ALPHA, epsilon=0.2)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("mean_multiple", {"theta": 0.0}, r"theta must be a finite number in \(0, inf\), got 0.0"),
        ("mean_multiple", {"theta": -1}, r"theta must be a finite number in \(0, inf\)"),
        ("mean_multiple", {"theta": math.nan}, "got nan"),
        ("zscore", {"alpha": -0.5}, r"alpha must be a finite number in \[0, inf\)"),
        ("zscore", {"alpha": math.inf}, "got inf"),
        ("entropy_delta", {"tau": math.nan}, r"tau must be a finite number in \[0, inf\)"),
        ("column_mass", {"eps": 1.5}, r"eps must be a finite number in \[0, 1\]"),
        ("sink_rate", {"eps": -0.1}, r"eps must be a finite number in \[0, 1\]"),
        ("act", {"threshold": 2.0}, r"threshold must be a finite number in \[0, 1\]"),
        ("act", {"threshold": True}, "got True"),
        ("zscore", {"alpha": "2"}, "got '2'"),
    ],
)
def test_invalid_thresholds_rejected(name, params, message):
    x = ALPHA if name == "sink_rate" else SPIKE5
    with pytest.raises(ValueError, match=message) as err:
        detect(name, x, **params)
    assert "\n" not in str(err.value)


def test_valid_thresholds_accepted_at_bounds():
    assert detect("column_mass", SPIKE5, eps=1.0).sum() == 0
    assert detect("column_mass", SPIKE5, eps=0).all()
    assert detect("zscore", SPIKE5, alpha=0).tolist() == [True, False, False, False, False]
    assert detect("mean_multiple", SPIKE5, theta=2).tolist() == [True, False, False, False, False]


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match=r"\[\.\.\., key\]"):
        detect("zscore", torch.tensor(0.5))
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        detect("zscore", SPIKE5, valid=torch.ones(5))
    with pytest.raises(ValueError, match="does not broadcast"):
        detect("zscore", SPIKE5, valid=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="other than the key axis"):
        detect("sink_rate", ALPHA, dims=(-2, -1))
    with pytest.raises(ValueError, match="out of range"):
        detect("sink_rate", SPIKE5)
    with pytest.raises(ValueError, match="at least one axis"):
        detect("sink_rate", ALPHA, dims=())


def test_register_detector():
    def top1(a: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return a == a.amax(-1, keepdim=True)

    custom = Detector("top1", top1, "row", {}, "test", "the largest key")
    try:
        assert register_detector(custom) is custom
        assert "top1" in list_detectors()
        assert detect("top1", SPIKE5).tolist() == [True, False, False, False, False]
        with pytest.raises(ValueError, match="already registered"):
            register_detector(custom)
        register_detector(Detector("top1", top1, "row", {}, "test", "again"), replace=True)
        assert get_detector("top1").doc == "again"
    finally:
        DETECTORS.pop("top1", None)


def test_bound():
    assert 0.5 in Bound(0.0, 1.0) and 0.0 in Bound(0.0) and 0.0 not in Bound(0.0, low_open=True)
    assert math.nan not in Bound(0.0) and math.inf not in Bound(0.0)
    assert str(Bound(0.0, 1.0)) == "[0, 1]" and str(Bound(0.0, low_open=True)) == "(0, inf)"
