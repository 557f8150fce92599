"""Captured statistics equal the ones computed from eager `output_attentions`, for every architecture family."""

from __future__ import annotations

import copy

import pytest
import torch

from sinkscope.capture import CaptureConfig, run_capture
from sinkscope.capture.attention import capture_session
from sinkscope.errors import SinkscopeError
from sinkscope.models import TINY_FAMILIES, tiny_model

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
    _assert_equals_eager(loaded, trace, ref, offsets, lengths)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_oss", "bert"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_batch_reduced_a_prompt_and_a_head_at_a_time_equals_eager(monkeypatch, family, padding_side):
    """On CPU a batch of long prompts is reduced one prompt at a time, and a very long prompt a few heads at a time,
    so a chunk stays cache-sized (`pass_sizes`); forced here on short prompts, every statistic still equals eager's
    (padding, GQA, learned sink logits with sliding windows, bidirectional)."""
    import sinkscope.capture.attention as capture

    cpu = torch.device("cpu")
    assert capture.pass_sizes(8, 12, 12, 2048, cpu) == (1, 1)  # 8 × 2,048 tokens: a prompt and a head at a time
    assert capture.pass_sizes(8, 12, 12, 128, cpu) == (4, 12)  # short prompts: half the batch per chunk
    assert capture.pass_sizes(8, 12, 4, 512, cpu) == (1, 2)  # GQA: a KV head's three query heads share a chunk
    assert capture.pass_sizes(1, 12, 12, 32768, cpu) == (1, 1)
    assert capture.pass_sizes(8, 12, 12, 2048, torch.device("cuda")) == (8, 12)  # accelerators: large kernels
    monkeypatch.setattr(capture, "_CPU_CHUNK_BYTES", 1)
    loaded = tiny_model(family)
    assert capture.pass_sizes(len(PROMPTS), loaded.info.n_heads, loaded.info.n_kv_heads, 16, cpu) == (1, 1)
    ref, offsets, lengths = _eager_reference(loaded, PROMPTS, padding_side)
    trace = run_capture(loaded, PROMPTS, CaptureConfig(maps=True, chunk_size=5), padding_side=padding_side)
    _assert_equals_eager(loaded, trace, ref, offsets, lengths)


def _assert_equals_eager(loaded, trace, ref, offsets, lengths):
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
        with capture_session(loaded.model, CaptureConfig(fused=False), enc["attention_mask"]):
            native = loaded.model(**enc)
    assert len(session.records) == loaded.info.n_layers
    field = "logits" if hasattr(plain, "logits") else "last_hidden_state"
    real = enc["attention_mask"].bool()  # fused: at real tokens (a padding query that sees no key gets zeros)
    # float32 rounding, not a change: on these models the model's own float32 forward is up to 1.5e-5 from a float64
    # one (Mixtral), and the fused one as close (measured against float64 for every family)
    torch.testing.assert_close(getattr(captured, field)[real], getattr(plain, field)[real], atol=2e-5, rtol=0)
    torch.testing.assert_close(getattr(native, field), getattr(plain, field), atol=0, rtol=0)  # native: bit for bit
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
        with capture_session(loaded.model, CaptureConfig(chunk_size=4), enc["attention_mask"]) as fused:
            out = loaded.model(**enc)
        with capture_session(loaded.model, CaptureConfig(fused=False), enc["attention_mask"]) as native:
            loaded.model(**enc)
    field = "logits" if hasattr(plain, "logits") else "last_hidden_state"
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(getattr(out, field)[mask], getattr(plain, field)[mask], atol=1e-5, rtol=0)
    for a, b in zip(fused.records, native.records, strict=True):
        torch.testing.assert_close(a.key_mass_sum, b.key_mass_sum, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_unpadded_prompt_skips_the_mask_and_matches_eager(loaded, chunk_size):
    """Without padding the model passes no n×n mask (mask=None): each chunk builds its own causal or full visibility.
    Every statistic still equals eager's, for chunk sizes that split the causal triangle differently, fused or not."""
    prompt = PROMPTS[2]
    ref, _, lengths = _eager_reference(loaded, [prompt], "right")
    n = int(lengths[0])
    for fused in (False, True):
        trace = run_capture(loaded, [prompt], CaptureConfig(maps=True, chunk_size=chunk_size, fused=fused))
        for layer, r in enumerate(ref):
            torch.testing.assert_close(trace.key_mass[0, layer], r["key_mass"][0], atol=TOL, rtol=0)
            torch.testing.assert_close(trace.key_count[0, layer], r["count"][0])
            torch.testing.assert_close(trace.entropy[0, layer], r["entropy"][0], atol=TOL, rtol=0)
            torch.testing.assert_close(trace.last_rows()[0, layer], r["row"][0], atol=TOL, rtol=0)
            torch.testing.assert_close(trace.maps[0, layer, :, :n, :n], r["maps"][0], atol=TOL, rtol=0)


def test_no_square_mask_for_unpadded_causal_input():
    """The registered mask function returns None (no n×n tensor) where SDPA itself would skip the mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from sinkscope.capture import ATTN_NAME

    fn = ALL_MASK_ATTENTION_FUNCTIONS[ATTN_NAME]
    assert fn(batch_size=1, q_length=64, kv_length=64, attention_mask=torch.ones(1, 64, dtype=torch.bool)) is None
    padded = torch.ones(2, 64, dtype=torch.bool)
    padded[1, :5] = False
    mask = fn(batch_size=2, q_length=64, kv_length=64, attention_mask=padded)
    assert mask is not None and mask.shape == (2, 1, 64, 64) and not bool(mask[1, 0, :, :5].any())


def test_chunk_size_adapts_to_free_memory(monkeypatch):
    import sinkscope.capture.attention as capture

    cpu = torch.device("cpu")
    real = capture.free_memory(cpu)
    assert real is None or real > 0
    assert capture.chunk_size_for(1, 12, 2048, cpu, requested=7) == 7
    monkeypatch.setattr(capture, "free_memory", lambda device: 2**40)
    short = capture.chunk_size_for(1, 4, 64, cpu)
    assert short * 4 * 64 * 4 <= capture._CPU_CHUNK_BYTES < (short + 1) * 4 * 64 * 4  # cache-sized
    # never fewer rows per KV head than keep the matmuls compute-bound (GQA: its query heads share them)
    assert capture.chunk_size_for(1, 12, 16384, cpu) == capture.min_chunk(1) == capture._MIN_ROWS
    assert capture.chunk_size_for(1, 12, 16384, cpu, group=3) == capture.min_chunk(3) == capture._MIN_ROWS // 3
    monkeypatch.setattr(capture, "free_memory", lambda device: 16 * 12 * 2048 * 4 * 10)  # room for 10 query rows
    assert capture.chunk_size_for(1, 12, 2048, cpu) == 10
    monkeypatch.setattr(capture, "free_memory", lambda device: 0)
    assert capture.chunk_size_for(8, 32, 2**17, cpu) == 1  # never zero


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_half_precision_statistics_accumulate_in_float32(family):
    """A bfloat16 model is captured with float32 statistics: key mass and entropy agree with a float32 capture of the
    same (bf16-rounded) weights to bf16 activation precision, rows still sum to 1, and the fused output keeps bf16."""
    lm16 = tiny_model(family)
    lm16.model.to(torch.bfloat16)
    lm32 = tiny_model(family)
    lm32.model.load_state_dict({k: v.float() for k, v in lm16.model.state_dict().items()})
    for fused in (False, True):
        t16 = run_capture(lm16, PROMPTS, CaptureConfig(fused=fused), padding_side="left")
        t32 = run_capture(lm32, PROMPTS, CaptureConfig(fused=fused), padding_side="left")
        assert t16.key_mass.dtype == torch.float32 and t16.entropy.dtype == torch.float32
        # bf16 activations drift from fp32 ones layer by layer; the statistics follow them, no more
        assert float((t16.key_mass - t32.key_mass).abs().mean()) < 2e-3
        assert float((t16.entropy - t32.entropy).abs().mean()) < 5e-3
        torch.testing.assert_close(t16.last_rows().sum(-1), torch.ones(3, t16.n_layers, t16.n_heads), atol=1e-5,
                                   rtol=0)
    enc = lm16.tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(), capture_session(lm16.model, CaptureConfig(fused=True), enc["attention_mask"]):
        out = lm16.model(**enc)
    assert out.logits.dtype == torch.bfloat16 and bool(torch.isfinite(out.logits).all())


def test_half_precision_inputs_are_reduced_in_float32():
    """Given bf16 queries, keys and values, the statistics equal a float32 softmax of the same (upcast) tensors to
    1e-5 — far below bf16's resolution (≈4e-3), so nothing is accumulated in bf16."""
    from sinkscope.capture.attention import _Session, _statistics

    torch.manual_seed(0)
    b, h, kvh, n, d = 2, 4, 2, 37, 16
    q, k, v = (torch.randn(b, x, n, d).to(torch.bfloat16) for x in (h, kvh, kvh))
    session = _Session(config=CaptureConfig(chunk_size=5), query_valid=torch.ones(b, n, dtype=torch.bool),
                       row_positions=torch.full((b, 1), n - 1))
    record, out = _statistics(session, q, k, v, None, True, d**-0.5, None, None, want_output=True)
    kf, vf = k.float().repeat_interleave(h // kvh, 1), v.float().repeat_interleave(h // kvh, 1)
    scores = (q.float() @ kf.transpose(-1, -2)) * d**-0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, -1)  # [b, h, n, n] float32
    torch.testing.assert_close(record.key_mass_sum, probs.sum(-2), atol=1e-5, rtol=0)
    torch.testing.assert_close(record.entropy, -torch.special.xlogy(probs, probs).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(record.rows[:, :, 0], probs[:, :, -1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out, (probs @ vf).transpose(1, 2), atol=1e-5, rtol=0)
    assert record.key_mass_sum.dtype == torch.float32 and out.dtype == torch.float32


def test_continuation_with_a_cache_prefix_matches_eager():
    """Queries that continue a cached prefix (q < k: the mask is materialised, bottom-right aligned) and a single query
    (no mask: it sees every key) give eager's statistics and logits."""
    from transformers import DynamicCache

    lm = tiny_model("llama")
    ids = torch.tensor([list(b"Attention sinks draw mass.")])
    n, s = ids.shape[1], 10
    eager = copy.deepcopy(lm.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        full = eager(ids, output_attentions=True)
        for split in (s, n - 1):  # 16 queries after 10 cached keys; one query after n − 1
            cache = DynamicCache(config=lm.model.config)
            lm.model(ids[:, :split], past_key_values=cache, use_cache=True)
            with capture_session(lm.model, CaptureConfig(rows=None, maps=True, chunk_size=3),
                                 torch.ones(1, n, dtype=torch.long)) as session:
                out = lm.model(ids[:, split:], past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits, full.logits[:, split:], atol=1e-5, rtol=0)
            for record, att in zip(session.records, full.attentions, strict=True):
                torch.testing.assert_close(record.maps, att[:, :, split:], atol=TOL, rtol=0)
                torch.testing.assert_close(record.key_mass_sum, att[:, :, split:].sum(-2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_read_columns_equal_eager(loaded, padding_side):
    """Attention columns — fixed positions and each head's candidate sinks (α > floor) — equal the eager maps'
    columns, computed without a [query, key] matrix."""
    ref, offsets, lengths = _eager_reference(loaded, PROMPTS, padding_side)
    fixed = run_capture(loaded, PROMPTS, CaptureConfig(columns=[0, -1], chunk_size=4), padding_side=padding_side)
    sinks = run_capture(loaded, PROMPTS, CaptureConfig(sink_columns=0.15, chunk_size=4), padding_side=padding_side)
    for p in range(len(PROMPTS)):
        o, n = int(offsets[p]), int(lengths[p])
        sl = slice(o, o + n)
        for layer, r in enumerate(ref):
            maps = r["maps"][p, :, sl, sl]  # [h, n, n]
            torch.testing.assert_close(fixed.columns[p, layer, :, :n, 0], maps[..., 0], atol=TOL, rtol=0)
            torch.testing.assert_close(fixed.columns[p, layer, :, :n, 1], maps[..., n - 1], atol=TOL, rtol=0)
            assert fixed.column_index[p, layer, :, 1].tolist() == [n - 1] * loaded.info.n_heads
            alpha = r["key_mass"][p, :, sl]  # [h, n]
            index = sinks.column_index[p, layer]  # [h, K]
            for head in range(loaded.info.n_heads):
                expected = sorted(torch.nonzero(alpha[head] > 0.15).flatten().tolist())
                got = index[head][index[head] >= 0]
                assert sorted(got.tolist()) == expected
                for slot, key in enumerate(got.tolist()):
                    torch.testing.assert_close(sinks.columns[p, layer, head, :n, slot], maps[head, :, key],
                                               atol=TOL, rtol=0)
            assert float(sinks.columns[p, layer, :, n:].abs().sum()) == 0.0


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_tag_moments_equal_moments_of_the_eager_outputs(loaded, padding_side):
    """The tag moments reduced inside the capture equal the same reduction of the eager maps' head outputs
    (A·V) and candidate columns, over each prompt's real tokens only."""
    from sinkscope.capture.moments import tag_moments

    ref, offsets, lengths = _eager_reference(loaded, PROMPTS, padding_side)
    trace = run_capture(loaded, PROMPTS, CaptureConfig(sink_columns=0.15, tag_moments=True, values=True,
                                                       chunk_size=4), padding_side=padding_side)
    assert trace.columns is None and trace.head_outputs is None
    h = loaded.info.n_heads
    for p in range(len(PROMPTS)):
        o, n = int(offsets[p]), int(lengths[p])
        sl = slice(o, o + n)
        for layer, r in enumerate(ref):
            maps = r["maps"][p, :, sl, sl].double()  # [h, n, n]
            v = trace.values[p, layer, :, :n].double()  # [kvh, n, d]
            v = v.repeat_interleave(h // v.shape[0], dim=0)  # [h, n, d]
            index = trace.column_index[p, layer]  # [h, K]
            idx = index.clamp(min=0)
            cols = maps.gather(-1, idx[:, None, :].expand(h, n, idx.shape[-1])) * (index >= 0)[:, None, :]
            vals = v.gather(1, idx[..., None].expand(*idx.shape, v.shape[-1])) * (index >= 0)[..., None]
            expected = tag_moments(maps @ v, cols, vals)
            for name, value in expected.items():
                torch.testing.assert_close(trace.tag_moments[name][p, layer].double(), value.double(), atol=1e-4,
                                           rtol=1e-4,
                                           msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_hidden_sites_and_logprobs_equal_the_model(loaded, padding_side):
    """Residual-stream sites (embeddings and block outputs) equal output_hidden_states, and the last-token
    log-probabilities equal the model's own, in prompt coordinates."""
    tok = loaded.tokenizer
    tok.padding_side = padding_side
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    with torch.no_grad():
        out = loaded.model(**enc, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
    causal = hasattr(out, "logits")
    config = CaptureConfig(hidden=("embed", "block"), logprobs=causal, fused=False)
    trace = run_capture(loaded, PROMPTS, config, padding_side=padding_side)
    assert [s.sublayer for s in trace.sites] == ["embed"] + ["block"] * loaded.info.n_layers
    offsets = (mask.cumsum(-1) == 0).sum(-1)
    for p in range(len(PROMPTS)):
        o, n = int(offsets[p]), int(mask[p].sum())
        for s in range(loaded.info.n_layers):  # hidden_states[l] enters block l; the last one is after the final norm
            torch.testing.assert_close(trace.hidden[p, s, :n], out.hidden_states[s][p, o:o + n].float(),
                                       atol=1e-5, rtol=0)
        assert float(trace.hidden[p, :, n:].abs().sum()) == 0.0
        if causal:
            expected = torch.log_softmax(out.logits[p, o + n - 1].float(), -1)
            torch.testing.assert_close(trace.logprobs[p], expected, atol=1e-5, rtol=0)
    if not causal:
        with pytest.raises(SinkscopeError, match="no language-model head"):
            run_capture(loaded, PROMPTS[:1], CaptureConfig(logprobs=True))


def test_token_ids_and_a_single_string(loaded):
    """run_capture takes one text (one prompt), texts, or token-id sequences; ids give the same trace as text."""
    one = run_capture(loaded, PROMPTS[1])
    assert one.n_prompts == 1 and one.prompts == [PROMPTS[1]]
    ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    by_ids = run_capture(loaded, ids, texts=PROMPTS)
    by_text = run_capture(loaded, PROMPTS)
    assert by_ids.input_ids == by_text.input_ids and by_ids.prompts == PROMPTS
    torch.testing.assert_close(by_ids.key_mass, by_text.key_mass, atol=TOL, rtol=0)


def test_trace_to_frame_is_tidy():
    """trace.to_frame gives one row per prompt × layer × head × real token with the shared key columns, and its
    values are the trace's tensors."""
    lm = tiny_model("llama")
    trace = run_capture(lm, PROMPTS)
    keys = trace.to_frame("keys")
    n_rows = sum(int(n) for n in trace.lengths) * trace.n_layers * trace.n_heads
    assert len(keys) == n_rows
    assert list(keys.columns[:5]) == ["prompt_id", "layer", "head", "position", "token"]
    row = keys[(keys["prompt_id"] == 2) & (keys["layer"] == 1) & (keys["head"] == 3) & (keys["position"] == 4)].iloc[0]
    assert row["token"] == trace.tokens[2][4]
    assert row["key_mass"] == pytest.approx(float(trace.key_mass[2, 1, 3, 4]))
    assert row["key_count"] == float(trace.key_count[2, 1, 4])
    queries = trace.to_frame("queries")
    assert len(queries) == n_rows
    assert queries["entropy"].sum() == pytest.approx(float(trace.entropy.sum()), rel=1e-5)
    last = trace.to_frame("last_row")
    sums = last.groupby(["prompt_id", "layer", "head"])["weight"].sum()
    assert sums.to_numpy() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SinkscopeError, match="unknown table"):
        trace.to_frame("maps")


def test_module_sink_logits_equal_s_aux():
    """A module that declares its learned sink logits (`sinkscope_sink_logits`: a tensor, or the name of its
    parameter) gets the statistics and the output of a call that passes them as `s_aux` (gpt-oss, whose native
    output is its eager function), fused or not; an `s_aux` argument wins over the declaration."""
    from sinkscope.capture.attention import sinkscope_attention

    lm = tiny_model("gpt_oss")
    attn = lm.model.model.layers[0].self_attn
    h, kvh, d = lm.info.n_heads, lm.info.n_kv_heads, lm.info.head_dim
    gen = torch.Generator().manual_seed(0)
    b, n = 2, 7
    q, k, v = (torch.randn(b, heads, n, d, generator=gen) for heads in (h, kvh, kvh))
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 5:] = 0
    visible = mask.bool()[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()  # [b, 1, n, n]
    sinks = attn.sinks.detach().clone()
    by_name = torch.nn.Module()
    by_name.sinks = torch.nn.Parameter(sinks.clone())
    by_name.sinkscope_sink_logits = "sinks"
    by_tensor = torch.nn.Module()
    by_tensor.register_buffer("sinkscope_sink_logits", sinks.clone())
    overridden = copy.deepcopy(attn)  # declares other logits than the ones its call passes
    overridden.register_buffer("sinkscope_sink_logits", sinks + 3.0)
    calls = [(attn, {"s_aux": attn.sinks}), (by_name, {}), (by_tensor, {}), (overridden, {"s_aux": overridden.sinks})]
    real = mask.bool()[:, :, None, None]  # outputs of padding queries are not compared
    for fused in (True, False):
        config = CaptureConfig(rows=None, maps=True, fused=fused)
        with torch.no_grad(), capture_session(lm.model, config, mask) as session:
            outputs = [sinkscope_attention(module, q, k, v, visible, scaling=d**-0.5, **kw)[0]
                       for module, kw in calls]
        ref = session.records[0]
        assert ref.sink_share is not None and float(ref.sink_share.max()) > 0.05
        for out, record in zip(outputs[1:], session.records[1:], strict=True):
            torch.testing.assert_close(out * real, outputs[0] * real, atol=TOL, rtol=0)
            for name in ("key_mass_sum", "key_count", "entropy", "sink_share", "maps"):
                torch.testing.assert_close(getattr(record, name), getattr(ref, name), atol=TOL, rtol=0, msg=name)


def test_zero_sink_logits_declared_by_a_llama_module():
    """A Llama whose attention modules declare a zero sink logit (softmax₁, "off by one") is captured with it:
    rows sum to 1 − sink share, and the fused output equals the native one."""
    lm = tiny_model("llama")
    model = copy.deepcopy(lm.model)
    for layer in model.model.layers:
        layer.self_attn.register_buffer("sinkscope_sink_logits", torch.zeros(lm.info.n_heads), persistent=False)
    assert not any("sinkscope" in name for name in model.state_dict())
    zero = type(lm)(model=model, tokenizer=lm.tokenizer, info=lm.info)
    trace = run_capture(zero, PROMPTS, CaptureConfig(rows="last"), padding_side="right")
    assert trace.sink_share is not None
    for p in range(len(PROMPTS)):
        last = int(trace.lengths[p]) - 1
        share = trace.sink_share[p, :, :, last]
        assert bool((share > 0).all())
        torch.testing.assert_close(trace.last_rows()[p].sum(-1), 1 - share, atol=TOL, rtol=0)
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        with capture_session(model, CaptureConfig(), enc["attention_mask"]):
            fused = model(**enc).logits
        with capture_session(model, CaptureConfig(fused=False), enc["attention_mask"]):
            native = model(**enc).logits
        plain = lm.model(**enc).logits
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(fused[real], native[real], atol=1e-5, rtol=0)
    assert float((native[real] - plain[real]).abs().max()) > 1e-3  # the sink changes the model


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_loss_equals_the_models_own_per_prompt(padding_side):
    """CaptureConfig(loss=True): per prompt, the summed next-token cross-entropy over its real tokens equals the
    model's own loss on the prompt alone, whatever the padding; token ids need no tokenizer."""
    lm = tiny_model("llama")
    ids = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    bare = type(lm)(model=lm.model, tokenizer=None, info=lm.info)
    trace = run_capture(bare, ids, CaptureConfig(rows=None, loss=True, logprobs=True), batch_size=2,
                        padding_side=padding_side)
    assert trace.tokens[1] == [str(i) for i in ids[1]]
    for p, seq in enumerate(ids):
        x = torch.tensor([seq])
        with torch.no_grad():
            out = lm.model(input_ids=x, labels=x)
        assert int(trace.nll_count[p]) == len(seq) - 1
        assert float(trace.nll_sum[p]) == pytest.approx(float(out.loss) * (len(seq) - 1), abs=1e-4)
        torch.testing.assert_close(trace.logprobs[p], torch.log_softmax(out.logits[0, -1], -1), atol=1e-5, rtol=0)
    with pytest.raises(SinkscopeError, match="no tokenizer"):
        run_capture(bare, PROMPTS)


@pytest.mark.parametrize("chunk", [(0, 5), (5, 16), (30, 37)])
def test_causal_query_counts_equal_the_visible_triangle(chunk):
    """With no mask but the causal triangle the per-key query counts come from c1 − max(c0, j), not from the chunk's
    [c, k] visibility: the same counts."""
    from sinkscope.capture.attention import _chunk_visibility, _query_counts

    c0, c1 = chunk
    _, visible, kend = _chunk_visibility(None, c0, c1, 37, 37, True, torch.device("cpu"))
    real = torch.ones(1, 37, dtype=torch.bool)
    closed = _query_counts(real, visible, c0, c1, kend, causal_only=True)
    assert torch.equal(closed, _query_counts(real, visible, c0, c1, kend, causal_only=False))
    assert closed[0, 0, 0] == c1 - c0 and closed[0, 0, kend - 1] == 1
