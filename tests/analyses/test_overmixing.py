"""Over-mixing and representation entropy (issue #18 item 2) against independent computations: the perturbation's
spread against a finite difference of two plain eager forwards done by hand (the masked condition with an additive
4-D mask that hides the sink from every later query), the entropy against numpy's SVD, the sink rate against eager
attention weights, and the embedding perturbation of `run_capture` against `inputs_embeds`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sinkscope.analyses.overmixing import (
    overmixing,
    perturbation,
    relative_change,
    representation_entropy,
    sink_rate,
)
from sinkscope.capture import CaptureConfig, run_capture
from sinkscope.errors import SinkscopeError

PROMPTS = ["The cat sat on the mat and looked at the birds.", "Attention sinks draw mass, a lot of it.",
           "Hi there, friend of mine"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def eager(tiny_llama):
    model = copy.deepcopy(tiny_llama.model)
    model.set_attn_implementation("eager")
    return model


def _hand_states(model, ids: list[int], delta: torch.Tensor | None, position: int, mask_sink: bool
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Embeddings and every block's output [L + 1, n, d] of one plain eager forward (no sinkscope code): the
    embedding of `position` shifted by `delta`, and with `mask_sink` an additive mask hiding key 0 from queries ≥ 1."""
    n = len(ids)
    x = model.get_input_embeddings()(torch.tensor([ids])).detach().clone()
    if delta is not None:
        x[0, position] += delta
    allow = torch.tril(torch.ones(n, n, dtype=torch.bool))
    if mask_sink:
        allow[1:, 0] = False
    mask = torch.zeros(n, n).masked_fill(~allow, torch.finfo(torch.float32).min)[None, None]
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(inputs_embeds=x, attention_mask=mask, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([x[0], *outs]).double(), out.attentions


POSITION, EPS = 2, 0.05


@pytest.fixture(scope="module")
def result(tiny_llama):
    return overmixing(tiny_llama, PROMPTS, position=POSITION, eps=EPS, seed=3, sink_threshold=0.05, max_tokens=24,
                      batch_size=2)


@pytest.mark.parametrize("condition", ["intact", "masked"])
def test_spread_matches_a_finite_difference_by_hand(tiny_llama, eager, result, condition: str) -> None:
    position = POSITION
    spread = result.tables["spread"]
    delta = perturbation(tiny_llama.model, EPS, seed=3)
    for pid, text in enumerate(PROMPTS):
        ids = list(tiny_llama.tokenizer(text)["input_ids"])[:24]
        clean, _ = _hand_states(eager, ids, None, position, condition == "masked")
        moved, _ = _hand_states(eager, ids, delta, position, condition == "masked")
        want = ((moved - clean).norm(dim=-1) / clean.norm(dim=-1)).numpy()  # [L + 1, n]
        got = (spread[(spread["condition"] == condition) & (spread["prompt_id"] == pid)]
               .pivot(index="layer", columns="position", values="rel_change").sort_index().to_numpy())
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)
        assert np.all(got[:, :position] == 0)  # causal: nothing before the perturbed token moves
    other = spread[spread["condition"] != condition]["rel_change"].to_numpy()
    assert not np.allclose(spread[spread["condition"] == condition]["rel_change"].to_numpy(), other)


def test_entropy_matches_numpy_svd() -> None:
    rng = np.random.default_rng(0)
    h = rng.normal(size=(7, 5)) * np.array([10.0, 1.0, 1.0, 0.5, 0.1])
    s = np.linalg.svd(h, compute_uv=False)
    p = s**2 / (s**2).sum()
    want = -(p * np.log(p)).sum()
    got, norm = representation_entropy(torch.tensor(h))
    assert got == pytest.approx(want, rel=1e-10)
    assert norm == pytest.approx(want / np.log(5), rel=1e-10)
    flat, flat_norm = representation_entropy(torch.eye(4))
    assert flat == pytest.approx(np.log(4)) and flat_norm == pytest.approx(1.0)


def test_layer_entropy_and_sink_rate_match_eager(tiny_llama, eager, result) -> None:
    table = result.tables["layer_entropy"]
    for pid, text in enumerate(PROMPTS[:2]):
        ids = list(tiny_llama.tokenizer(text)["input_ids"])[:24]
        states, attentions = _hand_states(eager, ids, None, 1, False)
        rows = table[(table["condition"] == "intact") & (table["prompt_id"] == pid)].sort_values("layer")
        for (_, row), h in zip(rows.iterrows(), states, strict=True):
            s = np.linalg.svd(h.numpy(), compute_uv=False)
            p = s**2 / (s**2).sum()
            assert row["entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4)
            norms = h.norm(dim=-1).numpy()
            assert row["bos_norm"] == pytest.approx(norms[0], rel=1e-4)
            assert row["median_norm"] == pytest.approx(float(torch.tensor(norms[1:]).median()), rel=1e-4)
        alpha0 = torch.stack([a[0, :, :, 0].mean(-1) for a in attentions])  # [L, H]: mean over queries of A_i0
        want = (alpha0 > 0.05).float().mean(-1).numpy()
        np.testing.assert_allclose(rows["sink_rate"].to_numpy()[1:], want)
        assert np.isnan(rows["sink_rate"].iloc[0])  # the embeddings have no attention
    masked = table[table["condition"] == "masked"]
    assert (masked["sink_rate"].dropna() == 0).all()  # nobody attends to a masked key (but query 0: α₀ = 1/n)


def test_sink_rate_counts_heads_over_the_threshold() -> None:
    key_mass = torch.zeros(1, 2, 4, 3)
    key_mass[0, 0, :3, 0] = 0.5
    key_mass[0, 1, 0, 0] = 0.3  # not above 0.3
    assert sink_rate(key_mass, 0.3).tolist() == [[0.75, 0.0]]


def test_relative_change() -> None:
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    moved = torch.tensor([[3.0, 5.0], [1.0, 0.0]])
    got = relative_change(h, moved)
    assert got[0] == pytest.approx(0.2) and torch.isnan(got[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_embed_delta_equals_inputs_embeds(tiny_llama, eager, side: str) -> None:
    """run_capture's embedding perturbation: the block outputs equal those of a plain forward on the shifted
    inputs_embeds, whatever the padding side; a position past a prompt is refused."""
    delta = torch.randn(tiny_llama.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = [list(tiny_llama.tokenizer(t)["input_ids"])[:12] for t in PROMPTS]
    trace = run_capture(tiny_llama, ids, CaptureConfig(rows=None, entropy=False, hidden=["embed", "block"]),
                        padding_side=side, embed_delta=(-2, delta))
    assert trace.info["embed_delta"]["position"] == -2
    for p, seq in enumerate(ids):
        want, _ = _hand_states(eager, seq, delta, len(seq) - 2, False)
        got = trace.hidden[p, :, : len(seq)].double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(SinkscopeError, match="cannot perturb position"):
        run_capture(tiny_llama, ids, CaptureConfig(rows=None), embed_delta=(40, delta))
    with pytest.raises(SinkscopeError, match="dimensions"):
        run_capture(tiny_llama, ids, CaptureConfig(rows=None), embed_delta=(0, delta[:3]))


def test_overmixing_tables_and_refusals(tiny_llama) -> None:
    result = overmixing(tiny_llama, [*PROMPTS, "", "a"], position=1, max_tokens=16)
    assert {"prompts", "skipped", "spread", "layer_entropy", "layers"} <= set(result.tables)
    assert result.tables["skipped"]["prompt_id"].tolist() == [3, 4]
    for name in ("spread", "layer_entropy"):
        assert {"prompt_id", "layer", "position", "token", "condition"} <= set(result.tables[name].columns)
    layers = result.tables["layers"]
    assert set(layers["condition"]) == {"intact", "masked"}
    assert sorted(set(layers["layer"])) == [-1, 0, 1]
    assert (layers.loc[layers["layer"] == -1, "spread_mean"] == 0).all()  # the embeddings of j > i are untouched
    assert set(result.summary["conditions"]) == {"intact", "masked"}
    with pytest.raises(SinkscopeError, match="sink itself"):
        overmixing(tiny_llama, PROMPTS, position=0)
    with pytest.raises(SinkscopeError, match="no usable prompt"):
        overmixing(tiny_llama, ["a"], position=5)
    with pytest.raises(SinkscopeError, match="positive"):
        overmixing(tiny_llama, PROMPTS, eps=0.0)
