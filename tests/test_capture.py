"""Captured statistics equal the ones computed from eager `output_attentions`, for every architecture family."""

from __future__ import annotations

import copy

import pytest
import torch

from sinkscope.capture import CaptureConfig, capture_session
from sinkscope.errors import SinkscopeError
from sinkscope.models import TINY_FAMILIES, tiny_model
from sinkscope.trace import run_capture

FAMILIES = sorted(TINY_FAMILIES)
PROMPTS = ["The cat sat on the mat.", "Hi!", "Attention sinks draw mass, a lot of it, often at BOS."]
TOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return tiny_model(request.param)


def _window(config, layer: int) -> int | None:
    """Sliding window of a layer, read from the config (independent of sinkscope's capture code)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    types = getattr(config, "layer_types", None)
    if types is None:
        return window if getattr(config, "use_sliding_window", True) else None
    return window if types[layer] == "sliding_attention" else None


def _eager_reference(lm, prompts, padding_side):
    """Run an eager copy with output_attentions=True and compute every statistic from the full maps."""
    tok = lm.tokenizer
    tok.padding_side = padding_side
    enc = tok(prompts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    kwargs = {k: v for k, v in enc.items()}
    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**kwargs, output_attentions=True)
    n = mask.shape[1]
    i = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    ref = []
    for layer, att in enumerate(out.attentions):  # att: [b, h, n, n]
        att = att.float()
        visible = mask.bool()[:, None, :] & mask.bool()[:, :, None]  # [b, q, k]
        if lm.info.is_causal:
            visible = visible & (k <= i)
            window = _window(lm.model.config, layer)
            if window is not None:
                visible = visible & (k > i - window)
        qv = mask.float()[:, None, :, None]
        key_sum = (att * qv).sum(-2)  # [b, h, k]
        count = visible.float().sum(-2)  # [b, k]
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # last real token  [b]
        ref.append({
            "key_mass": key_sum / count[:, None].clamp(min=1),
            "key_sum": key_sum,
            "count": count,
            "row": att[torch.arange(att.shape[0]), :, last],  # [b, h, k]
            "entropy": -torch.special.xlogy(att, att).sum(-1),
            "sink_share": 1 - att.sum(-1),
            "maps": att,
        })
    offsets = (mask.cumsum(-1) == 0).sum(-1)
    return ref, offsets, mask.sum(-1)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_capture_equals_eager(loaded, padding_side):
    ref, offsets, lengths = _eager_reference(loaded, PROMPTS, padding_side)
    trace = run_capture(loaded, PROMPTS, CaptureConfig(maps=True, chunk_size=5), padding_side=padding_side)
    assert trace.key_mass.shape[:3] == (len(PROMPTS), loaded.info.n_layers, loaded.info.n_heads)
    for p in range(len(PROMPTS)):
        o, n = int(offsets[p]), int(lengths[p])
        sl = slice(o, o + n)
        assert trace.lengths[p] == n
        for layer, r in enumerate(ref):
            torch.testing.assert_close(trace.key_mass[p, layer, :, :n], r["key_mass"][p, :, sl], atol=TOL, rtol=0)
            torch.testing.assert_close(trace.key_mass_sum[p, layer, :, :n], r["key_sum"][p, :, sl], atol=TOL, rtol=0)
            torch.testing.assert_close(trace.key_count[p, layer, :n], r["count"][p, sl])
            torch.testing.assert_close(trace.last_rows()[p, layer, :, :n], r["row"][p, :, sl], atol=TOL, rtol=0)
            torch.testing.assert_close(trace.entropy[p, layer, :, :n], r["entropy"][p, :, sl], atol=TOL, rtol=0)
            torch.testing.assert_close(trace.maps[p, layer, :, :n, :n], r["maps"][p, :, sl, sl], atol=TOL, rtol=0)
            if trace.sink_share is not None:
                torch.testing.assert_close(
                    trace.sink_share[p, layer, :, :n], r["sink_share"][p, :, sl], atol=TOL, rtol=0
                )
        # beyond the prompt's length everything is zero
        assert float(trace.key_mass[p, :, :, n:].abs().sum()) == 0.0


def test_learned_sink_share_reported(loaded):
    trace = run_capture(loaded, PROMPTS[:1])
    if loaded.info.model_type == "gpt_oss":
        assert trace.sink_share is not None
        share = trace.sink_share[0, :, :, : int(trace.lengths[0])]
        assert bool((share >= 0).all()) and bool((share < 1).all()) and float(share.mean()) > 0.05
        rows = trace.last_rows()[0].sum(-1)  # rows sum to 1 − learned sink share
        torch.testing.assert_close(rows, 1 - trace.sink_share[0, :, :, int(trace.lengths[0]) - 1], atol=TOL, rtol=0)
    else:
        assert trace.sink_share is None
        torch.testing.assert_close(trace.last_rows()[0].sum(-1), torch.ones(trace.n_layers, trace.n_heads))


def test_logits_unchanged_by_capture(loaded):
    tok = loaded.tokenizer
    tok.padding_side = "right"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = loaded.model(**enc)
        with capture_session(loaded.model, CaptureConfig(), enc["attention_mask"]) as session:
            captured = loaded.model(**enc)
    assert len(session.records) == loaded.info.n_layers
    out_plain = plain.logits if hasattr(plain, "logits") else plain.last_hidden_state
    out_capt = captured.logits if hasattr(captured, "logits") else captured.last_hidden_state
    torch.testing.assert_close(out_capt, out_plain, atol=1e-5, rtol=0)
    # the model's own attention implementation is restored afterwards
    assert loaded.model.config._attn_implementation != "sinkscope"


def test_batched_equals_single(loaded):
    both = run_capture(loaded, PROMPTS, batch_size=3, padding_side="left")
    for p, prompt in enumerate(PROMPTS):
        one = run_capture(loaded, [prompt])
        n = int(one.lengths[0])
        torch.testing.assert_close(both.key_mass[p, ..., :n], one.key_mass[0, ..., :n], atol=TOL, rtol=0)
        torch.testing.assert_close(both.last_rows()[p, ..., :n], one.last_rows()[0, ..., :n], atol=TOL, rtol=0)
        assert both.tokens[p] == one.tokens[0]


def test_head_outputs_and_values():
    lm = tiny_model("llama")
    trace = run_capture(lm, PROMPTS[:1], CaptureConfig(head_outputs=True, values=True, maps=True))
    n = int(trace.lengths[0])
    g = lm.info.n_heads // lm.info.n_kv_heads
    v = trace.values[0].repeat_interleave(g, dim=1)  # [L, H, N, d]
    expected = trace.maps[0] @ v
    torch.testing.assert_close(trace.head_outputs[0, :, :, :n], expected[:, :, :n], atol=TOL, rtol=0)


def test_selected_rows_and_errors():
    lm = tiny_model("llama")
    trace = run_capture(lm, PROMPTS[:2], CaptureConfig(rows=[0, -1], maps=True))
    assert trace.rows.shape[3] == 2
    for p in range(2):
        n = int(trace.lengths[p])
        torch.testing.assert_close(trace.rows[p, :, :, 1], trace.maps[p, :, :, n - 1])
        torch.testing.assert_close(trace.rows[p, :, :, 0], trace.maps[p, :, :, 0])
    with pytest.raises(SinkscopeError, match="empty"):
        run_capture(lm, ["ok", "  "])
    with pytest.raises(SinkscopeError, match="no prompts"):
        run_capture(lm, [])
    with pytest.raises(SinkscopeError, match="context"):
        run_capture(lm, ["x" * 600])
    with pytest.raises(SinkscopeError, match="outside"):
        run_capture(lm, ["ab"], CaptureConfig(rows=[50]))


def test_maps_skipped_for_long_prompts():
    lm = tiny_model("gpt2")
    trace = run_capture(lm, ["a" * 40], CaptureConfig(maps=True, max_map_tokens=16))
    assert trace.maps is None


def test_fused_capture_matches_native(loaded):
    """fused=True computes the output from the statistics' own chunks: same logits and statistics."""
    tok = loaded.tokenizer
    tok.padding_side = "right"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = loaded.model(**enc)
        with capture_session(loaded.model, CaptureConfig(fused=True, chunk_size=4), enc["attention_mask"]) as fused:
            out = loaded.model(**enc)
        with capture_session(loaded.model, CaptureConfig(), enc["attention_mask"]) as native:
            loaded.model(**enc)
    field = "logits" if hasattr(plain, "logits") else "last_hidden_state"
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(getattr(out, field)[mask], getattr(plain, field)[mask], atol=1e-5, rtol=0)
    for a, b in zip(fused.records, native.records, strict=True):
        torch.testing.assert_close(a.key_mass_sum, b.key_mass_sum, atol=1e-5, rtol=0)
