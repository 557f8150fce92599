"""Interventions in the forward pass against hand-made forward passes and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from sinkscope.capture import (
    Calibrate,
    CaptureConfig,
    MaskKeyPerRow,
    MaskKeys,
    Reweight,
    ReweightSinks,
    Temperature,
    intervene,
)
from sinkscope.capture.attention import capture_session
from sinkscope.errors import SinkscopeError
from sinkscope.models import tiny_model

TEXT = ["The cat sat on the mat, twice."]
MASKED = {"layers": {1}, "positions": [0, 3]}


def _manual_masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Independent eager attention: −inf logits at the masked keys of the masked layers, then softmax."""
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    scores = query @ k.transpose(-1, -2) * scaling + attention_mask
    if module.layer_idx in MASKED["layers"]:
        scores[..., MASKED["positions"]] = -math.inf
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("manual_masked", _manual_masked_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("manual_masked", eager_mask)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def _logits(lm):
    enc = lm.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**enc).logits


def test_masking_equals_manual_masked_softmax(lm):
    with intervene(lm.model, MaskKeys(positions=MASKED["positions"], layers=[1])):
        got = _logits(lm)
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("manual_masked")
    try:
        expected = _logits(lm)
    finally:
        lm.model.set_attn_implementation(previous)
    # query 0 sees only key 0: with it masked the manual row is undefined, the intervention leaves such rows as they are
    torch.testing.assert_close(got[:, 1:], expected[:, 1:], atol=1e-5, rtol=0)
    assert not torch.allclose(got, _logits(lm), atol=1e-3)  # the intervention changed the output


@pytest.mark.parametrize("identity", [Calibrate(beta=1.0), Temperature(t=1.0), Reweight(weights=[1.0] * 4),
                                      MaskKeys(positions=[999])])
def test_identity_interventions(lm, identity):
    plain = _logits(lm)
    with intervene(lm.model, identity):
        torch.testing.assert_close(_logits(lm), plain, atol=1e-5, rtol=0)


def test_calibration_by_hand():
    # one head, 3 queries × 3 keys (causal). Column means: α_0 = (1 + .7 + .6)/3 = .767, α_1 = (.3 + .2)/2 = .25,
    # α_2 = .2 → hits 0, 1, 2; the first hit (0) is excluded, so S = {1, 2}.
    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.6, 0.2, 0.2]]]])
    bias = torch.tensor([[[[0.0, -math.inf, -math.inf], [0.0, 0.0, -math.inf], [0.0, 0.0, 0.0]]]])
    out = Calibrate(beta=0.5)(probs, 0, bias)
    # row 1: .3 → .15, removed .15 goes to key 0 (the only non-sink): .7 + .15 = .85
    # row 2: .2, .2 → .1, .1; removed .2 goes to key 0: .6 + .2 = .8
    expected = torch.tensor([[[[1.0, 0.0, 0.0], [0.85, 0.15, 0.0], [0.8, 0.1, 0.1]]]])
    torch.testing.assert_close(out, expected)


def test_temperature_and_reweight_by_hand():
    probs = torch.tensor([[[[0.5, 0.3, 0.2]]]])
    bias = torch.zeros(1, 1, 1, 3)
    sharp = Temperature(t=0.5)(probs, 0, bias)
    torch.testing.assert_close(sharp, torch.tensor([[[[0.25, 0.09, 0.04]]]]) / 0.38)
    rew = Reweight(weights=[0.0, 1.0, 2.0])(probs, 0, bias)  # [0, .3, .4] / .7
    torch.testing.assert_close(rew, torch.tensor([[[[0.0, 0.3, 0.4]]]]) / 0.7)


@pytest.mark.parametrize("hook", [Calibrate(beta=0.5), MaskKeys(positions=[0]), Reweight(weights=[0.0, 1.0, 2.0]),
                                  ReweightSinks(gamma=0.4)], ids=lambda h: type(h).__name__)
def test_interventions_give_the_same_rows_with_gradients(hook):
    # without gradients the changes run in place; with them they keep autograd's tensors: same rows, and a gradient
    probs = torch.softmax(torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 3, -1)
    probs = probs.tril() / probs.tril().sum(-1, keepdim=True)
    bias = torch.zeros(1, 1, 4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), -math.inf)
    plain = hook(probs, 0, bias)
    leaf = probs.clone().requires_grad_(True)
    tracked = hook(leaf, 0, bias)
    torch.testing.assert_close(tracked.detach(), plain, atol=0, rtol=0)
    (tracked * torch.arange(4.0)).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_head_scope_and_capture_sees_the_change(lm):
    enc = lm.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad(), intervene(lm.model, MaskKeys(positions=[0], layers=[1], heads=[2])), \
            capture_session(lm.model, CaptureConfig(), enc["attention_mask"]) as session:
        lm.model(**enc)
    mass = torch.stack([r.key_mass_sum[0] for r in session.records])  # [L, H, k]
    # only query 0 (which sees nothing else) still attends to key 0 in the masked head
    assert float(mass[1, 2, 0]) == pytest.approx(1.0, abs=1e-6)
    assert float(mass[1, [0, 1, 3], 0].min()) > 1.05 and float(mass[0, :, 0].min()) > 1.05


def test_learned_sink_share_is_kept():
    lm = tiny_model("gpt_oss")
    enc = lm.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad(), capture_session(lm.model, CaptureConfig(), enc["attention_mask"]) as plain:
        lm.model(**enc)
    with torch.no_grad(), intervene(lm.model, MaskKeys(positions=[0])), \
            capture_session(lm.model, CaptureConfig(), enc["attention_mask"]) as masked:
        lm.model(**enc)
    first, changed = plain.records[0], masked.records[0]  # layer 0 sees the same input in both runs
    torch.testing.assert_close(changed.sink_share[..., 1:], first.sink_share[..., 1:], atol=1e-5, rtol=0)
    # only query 0 still attends to key 0
    torch.testing.assert_close(changed.key_mass_sum[..., 0], 1 - changed.sink_share[..., 0], atol=1e-5, rtol=0)


def test_generation_under_calibration(lm):
    enc = lm.tokenizer(TEXT, return_tensors="pt")
    calib = Calibrate(beta=0.4)
    with torch.no_grad(), intervene(lm.model, calib):
        out = lm.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4
    assert set(calib._sinks) == {0, 1}


def test_bad_parameters():
    with pytest.raises(SinkscopeError):
        Calibrate(beta=2.0)
    with pytest.raises(SinkscopeError):
        Temperature(t=0.0)


def test_interventions_refuse_layers_and_heads_the_model_lacks():
    lm = tiny_model("llama")  # 2 layers × 4 heads
    too_deep = MaskKeys(positions=[0], layers=[3, 4])
    with pytest.raises(SinkscopeError, match=r"layers \[3, 4\] do not exist; the model has layers 0-1"), \
            intervene(lm.model, too_deep):
        pass
    with pytest.raises(SinkscopeError, match=r"heads \[7\] do not exist"), \
            intervene(lm.model, Temperature(t=2.0, heads=[7])):
        pass


def _full_attention(hooks, query, key, value, mask, s_aux=None):
    """The whole [b, h, q, k] matrix changed at once (the path a capture session takes)."""
    from sinkscope.capture.attention import _weighted_values, additive_bias, attention_probs

    bias = additive_bias(mask, query, key, True, None)
    probs = attention_probs(query, key, bias, 0.5, None, s_aux)
    for hook in hooks:
        probs = hook(probs, 0, bias)
    return _weighted_values(probs, value)


@pytest.mark.parametrize("hooks", [
    [MaskKeys(positions=[0, -1])], [MaskKeyPerRow(keys=[0, 2])], [Reweight(weights=[0.2, 3.0])],
    [ReweightSinks(gamma=0.0)], [Temperature(t=0.7)], [Calibrate(beta=0.3, threshold=0.05, heads=[1, 3])],
    [Calibrate(beta=0.5, threshold=0.05), MaskKeys(positions=[1])], [Temperature(t=0.7), Calibrate(beta=0.5)],
])
@pytest.mark.parametrize("sinks", [False, True])
def test_chunked_interventions_equal_the_whole_matrix(hooks, sinks):
    """A prompt under interventions is computed a few queries at a time (no [b, h, q, k] tensor); the output is the
    one of changing the whole matrix, with padding (right-padded row 1), GQA, learned sink logits and ACT's column
    means over every real query."""
    from sinkscope.capture.intervene import chunked_attention

    torch.manual_seed(0)
    b, h, kvh, n, d = 2, 4, 2, 11, 8
    query, key, value = torch.randn(b, h, n, d), torch.randn(b, kvh, n, d), torch.randn(b, kvh, n, d)
    key[:, :, 0] *= 4  # a key that draws attention, so ACT finds sinks
    real = torch.ones(b, n, dtype=torch.bool)
    real[1, 8:] = False
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & real[:, None, None, :]  # [b, 1, q, k]
    s_aux = torch.randn(h) if sinks else None
    expected = _full_attention(hooks, query, key, value, mask, s_aux)
    got = chunked_attention(hooks, 0, query, key, value, mask, True, 0.5, s_aux=s_aux, chunk=3)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, :8], expected[1, :8], atol=1e-5, rtol=0)  # the real queries of row 1
    nomask = chunked_attention(hooks[:1] if isinstance(hooks[0], MaskKeyPerRow) else hooks, 0, query, key, value,
                               None, True, 0.5, s_aux=s_aux, chunk=4)
    full = _full_attention(hooks[:1] if isinstance(hooks[0], MaskKeyPerRow) else hooks, query, key, value, None,
                           s_aux)
    torch.testing.assert_close(nomask, full, atol=1e-5, rtol=0)


def test_a_prompt_under_interventions_never_holds_the_whole_matrix(lm):
    """Without a capture session the interventions see the prompt's queries a chunk at a time (decode steps whole),
    and the logits are the ones of a capture session, which changes the whole matrix."""
    seen = []

    class Record(Temperature):
        def change(self, probs, layer, visible):
            seen.append(tuple(probs.shape[-2:]))
            return super().change(probs, layer, visible)

    enc = lm.tokenizer(["The cat sat on the mat and looked at the dog for a long while, then slept."] * 2,
                       return_tensors="pt")
    n = enc["input_ids"].shape[1]
    with torch.no_grad(), intervene(lm.model, Record(t=0.8), Calibrate(beta=0.4)):
        got = lm.model(**enc).logits
    assert n > 16 and max(q for q, _ in seen) < n and all(k == n for _, k in seen)
    with torch.no_grad(), intervene(lm.model, Temperature(t=0.8), Calibrate(beta=0.4)), \
            capture_session(lm.model, CaptureConfig(), enc["attention_mask"]):
        whole = lm.model(**enc).logits
    torch.testing.assert_close(got, whole, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hooks", [[MaskKeys(positions=[0])], [Calibrate(beta=0.5, threshold=0.05)],
                                   [ReweightSinks(gamma=0.4)]], ids=lambda h: type(h[0]).__name__)
def test_chunked_interventions_keep_gradients(hooks):
    """A forward pass under interventions with gradients on (no torch.no_grad) gives the same output as without them,
    and gradients reach the queries and keys: the chunks then use no reused buffers or in-place changes."""
    from sinkscope.capture.intervene import chunked_attention

    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    with torch.no_grad():
        plain = chunked_attention(hooks, 0, query, key, value, None, True, 0.5, chunk=4)
    q, k = query.clone().requires_grad_(True), key.clone().requires_grad_(True)
    out = chunked_attention(hooks, 0, q, k, value, None, True, 0.5, chunk=4)
    torch.testing.assert_close(out.detach(), plain, atol=1e-6, rtol=0)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
