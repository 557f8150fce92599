"""Detect-mask-renormalise (seed 000 Algorithm 1), eq. (1) renormalisation and row aggregation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkscope.analyses.mitigate import DMRResult, aggregate_rows, detect_mask_renormalise, renormalise
from sinkscope.detect import detect

ROW = ["mean_multiple", "zscore", "entropy_delta"]


def _rows(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random skewed attention rows summing to 1 over the last dim."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) ** 4
    return x / x.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------------------
# renormalise / eq. (1)


def test_renormalise_eq1_by_hand():
    # A'_ij = A_ij / Σ_k A_ik over the kept keys k (key 0 removed):
    # row 0: kept (0.25, 0.125, 0.125), Σ = 0.5 → (0, 0.5, 0.25, 0.25)
    # row 1: kept (0.2, 0.2, 0.1),     Σ = 0.5 → (0, 0.4, 0.4, 0.2)
    # row 2: kept (0.5, 0.25, 0.25),   Σ = 1   → unchanged
    A = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.5, 0.2, 0.2, 0.1], [0.0, 0.5, 0.25, 0.25]])
    keep = torch.tensor([False, True, True, True])
    expected = torch.tensor([[0, 0.5, 0.25, 0.25], [0, 0.4, 0.4, 0.2], [0, 0.5, 0.25, 0.25]])
    torch.testing.assert_close(renormalise(A, keep), expected)
    # Along the query axis (dim=0), keeping rows 1 and 2: column 1 → (0, 0.2, 0.5)/0.7.
    out = renormalise(A, torch.tensor([[False], [True], [True]]), dim=0)
    torch.testing.assert_close(out[:, 1], torch.tensor([0.0, 0.2, 0.5]) / 0.7)


def test_renormalise_nothing_left_falls_back_to_valid_renormalised():
    a = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # Every key masked: a comes back renormalised over valid keys, unchanged for a distribution.
    torch.testing.assert_close(renormalise(a, torch.zeros(4, dtype=torch.bool)), a)
    # Only a zero-mass key kept: the same fallback.
    torch.testing.assert_close(
        renormalise(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([False, False, True])), torch.tensor([0.5, 0.5, 0.0])
    )
    # With padding: renormalised over the 3 valid keys, (0.4, 0.3, 0.2)/0.9.
    valid = torch.tensor([True, True, True, False])
    out = renormalise(a, torch.zeros(4, dtype=torch.bool), valid=valid)
    torch.testing.assert_close(out, torch.tensor([0.4, 0.3, 0.2, 0.0]) / 0.9)
    # No mass at all: zeros, never NaN.
    assert renormalise(torch.zeros(3), torch.ones(3, dtype=torch.bool)).tolist() == [0.0, 0.0, 0.0]


def test_renormalise_never_keeps_invalid_keys():
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = renormalise(a, torch.ones(4, dtype=torch.bool), valid=torch.tensor([True, True, True, False]))
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0, 0.0]) / 6)


def test_renormalise_rejects_bad_masks():
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        renormalise(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="does not broadcast"):
        renormalise(torch.ones(3), torch.ones(2, 4, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------
# detect-mask-renormalise


def test_dmr_zscore_by_hand():
    # (0.6, 0.1, 0.1, 0.1, 0.1): z_0 = 0.4/0.2 = 2 > 1.5 → key 0 is a sink; the rest (0.1 ×4) renormalise to 0.25.
    a = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])
    result = detect_mask_renormalise(a, "zscore", alpha=1.5)
    assert isinstance(result, DMRResult)
    assert result.sinks.tolist() == [True, False, False, False, False]
    torch.testing.assert_close(result.b, torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25]))
    assert result.method == "zscore" and dict(result.params) == {"alpha": 1.5}
    # Default α = 2: z_0 = 2 is not > 2, nothing removed, b = a.
    default = detect_mask_renormalise(a)
    assert not default.sinks.any() and dict(default.params) == {"alpha": 2.0}
    torch.testing.assert_close(default.b, a)


def test_dmr_entropy_by_hand():
    # a = (0.5, 0.05 ×10), H(a) = 0.5 ln 2 + 0.5 ln 20 = 1.8444397.
    # Without key 0: uniform over 10, H = ln 10 = 2.3025851, ΔH_0 = −0.4581454.
    # Without a 0.05: (0.5, 0.05 ×9)/0.95, H = 1.7325521, ΔH = 0.1118876.
    # τ = 0.2 flags key 0 only; b = (0, 0.1 ×10).
    a = torch.tensor([0.5] + [0.05] * 10)
    result = detect_mask_renormalise(a, "entropy_delta", tau=0.2)
    assert result.sinks.tolist() == [True] + [False] * 10
    torch.testing.assert_close(result.b, torch.tensor([0.0] + [0.1] * 10))
    # τ = 0.1 also flags the 0.05s (0.1119 > 0.1): every key is a sink, so b falls back to a.
    everything = detect_mask_renormalise(a, "entropy_delta")
    assert everything.sinks.all()
    torch.testing.assert_close(everything.b, a)


def test_dmr_mean_multiple_by_hand():
    # μ = 1/6; θ = 2 → keys above 1/3: 0.4 and 0.35 are sinks; the rest (0.1, 0.05, 0.05, 0.05) sum to 0.25.
    a = torch.tensor([0.4, 0.1, 0.35, 0.05, 0.05, 0.05])
    result = detect_mask_renormalise(a, "mean_multiple", theta=2.0)
    assert result.sinks.tolist() == [True, False, True, False, False, False]
    torch.testing.assert_close(result.b, torch.tensor([0.0, 0.4, 0.0, 0.2, 0.2, 0.2]))


def test_dmr_column_detector_reads_detect_on():
    # Column mass α = (0.5, 0.1, 0.3, 0.05) > ε = 0.2 flags keys 0 and 2; a's other keys (0.3, 0.1)/0.4.
    a = torch.tensor([0.4, 0.3, 0.2, 0.1])
    alpha = torch.tensor([0.5, 0.1, 0.3, 0.05])
    result = detect_mask_renormalise(a, "column_mass", detect_on=alpha)
    assert result.sinks.tolist() == [True, False, True, False]
    torch.testing.assert_close(result.b, torch.tensor([0.0, 0.75, 0.0, 0.25]))
    # act on α: hits 0 and 2, the first (key 0) excluded → only key 2 removed: (0.4, 0.3, 0.1)/0.8.
    hidden = detect_mask_renormalise(a, "act", detect_on=alpha)
    torch.testing.assert_close(hidden.b, torch.tensor([0.5, 0.375, 0.0, 0.125]))
    # A [key] α applies to every head of per-head rows.
    rows = _rows((2, 3, 4))
    per_head = detect_mask_renormalise(rows, "column_mass", detect_on=alpha)
    assert per_head.sinks.shape == rows.shape and per_head.sinks[..., [0, 2]].all()
    torch.testing.assert_close(per_head.b, renormalise(rows, ~alpha.gt(0.2)))


def test_dmr_rejects_rates_and_bad_shapes():
    with pytest.raises(ValueError, match="sink_rate returns a rate, not a sink mask; use one of: act"):
        detect_mask_renormalise(torch.ones(4) / 4, "sink_rate")
    with pytest.raises(ValueError, match="does not broadcast"):
        detect_mask_renormalise(torch.ones(4) / 4, "column_mass", detect_on=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="allowed: alpha"):
        detect_mask_renormalise(torch.ones(4) / 4, "zscore", tau=0.1)
    with pytest.raises(ValueError, match="valid names"):
        detect_mask_renormalise(torch.ones(4) / 4, "entropy")


@pytest.mark.parametrize("method", [*ROW, "column_mass", "act"])
def test_dmr_batched_equals_loop(method):
    a = _rows((2, 3, 4, 8), seed=1)
    batched = detect_mask_renormalise(a, method)
    flat = [detect_mask_renormalise(v, method) for v in a.reshape(-1, 8)]
    torch.testing.assert_close(batched.b, torch.stack([r.b for r in flat]).reshape(a.shape))
    assert torch.equal(batched.sinks, torch.stack([r.sinks for r in flat]).reshape(a.shape))


@pytest.mark.parametrize("method", ROW)
def test_dmr_valid_matches_truncated(method):
    a = _rows((3, 6), seed=2)
    padded = torch.cat([a, torch.full((3, 2), 0.9)], dim=-1)
    valid = torch.arange(8) < 6
    result = detect_mask_renormalise(padded, method, valid=valid)
    truncated = detect_mask_renormalise(a, method)
    assert (result.b[:, 6:] == 0).all() and not result.sinks[:, 6:].any()
    torch.testing.assert_close(result.b[:, :6], truncated.b)
    assert torch.equal(result.sinks[:, :6], truncated.sinks)


_prob = st.floats(min_value=0.0, max_value=1.0, width=32)


@settings(deadline=None, max_examples=100)
@given(st.lists(_prob, min_size=2, max_size=64).filter(lambda v: sum(v) > 0), st.sampled_from(ROW))
def test_property_dmr_is_a_distribution(values, method):
    a = torch.tensor(values)
    a = a / a.sum()
    result = detect_mask_renormalise(a, method)
    assert result.b.shape == a.shape and result.sinks.dtype == torch.bool
    assert torch.isfinite(result.b).all() and (result.b >= 0).all()
    assert result.b.sum().item() == pytest.approx(1.0, abs=1e-5)
    if (a * ~result.sinks).sum() > 0:  # some mass survives: sinks are zeroed
        assert (result.b[result.sinks] == 0).all()


# --------------------------------------------------------------------------------------------------------
# aggregate_rows


def test_aggregate_rows_default_is_last_layer_mean_over_heads():
    rows = _rows((3, 4, 6), seed=3)  # [layer, head, key]
    # seed 000 §4.1: a_i = (1/H) Σ_h A^{(L,h)}_{n,i}, L the last layer.
    manual = (rows[2, 0] + rows[2, 1] + rows[2, 2] + rows[2, 3]) / 4
    torch.testing.assert_close(aggregate_rows(rows), manual)
    assert aggregate_rows(rows).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_aggregate_rows_selection():
    rows = _rows((3, 4, 6), seed=4)
    # layers 0 and 2 (as -1), heads 1 and 3 (as -1): four rows with equal weight.
    manual = (rows[0, 1] + rows[0, 3] + rows[2, 1] + rows[2, 3]) / 4
    torch.testing.assert_close(aggregate_rows(rows, layers=[0, -1], heads=[1, -1]), manual)
    torch.testing.assert_close(aggregate_rows(rows, layers=range(3)), rows.mean(dim=(0, 1)))
    torch.testing.assert_close(aggregate_rows(rows, layers=1, heads=2), rows[1, 2])
    kept = aggregate_rows(rows, layers=[1, 2], heads=[0, 2], reduce="none")
    assert kept.shape == (2, 2, 6)
    torch.testing.assert_close(kept, rows[1:3][:, [0, 2]])


def test_aggregate_rows_batched():
    rows = _rows((2, 3, 4, 6), seed=5)  # [batch, layer, head, key]
    torch.testing.assert_close(aggregate_rows(rows), torch.stack([aggregate_rows(r) for r in rows]))
    assert aggregate_rows(rows, reduce="none").shape == (2, 1, 4, 6)


def test_aggregate_rows_then_per_head_dmr():
    rows = _rows((3, 4, 6), seed=6)
    per_head = aggregate_rows(rows, layers=[-2, -1], reduce="none")
    result = detect_mask_renormalise(per_head, "zscore")
    assert torch.equal(result.sinks, detect("zscore", rows[1:]))
    torch.testing.assert_close(result.b.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [3]}, r"layer index 3 out of range; layers are \[-3, 3\)"),
        ({"heads": [-5]}, r"head index -5 out of range"),
        ({"layers": []}, "layer selection is empty"),
        ({"heads": [0, -4]}, "repeats an index"),
        ({"reduce": "sum"}, "reduce must be 'mean' or 'none'"),
    ],
)
def test_aggregate_rows_rejects_bad_selection(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aggregate_rows(_rows((3, 4, 6)), **kwargs)


def test_aggregate_rows_needs_three_dims():
    with pytest.raises(ValueError, match=r"\[\.\.\., layer, head, key\]"):
        aggregate_rows(torch.ones(4, 6))
