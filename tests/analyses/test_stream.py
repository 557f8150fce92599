"""StreamingLLM cache: equal to the full cache before eviction; RoPE re-positioning against a direct computation."""

from __future__ import annotations

import pytest
import torch

from sinkscope.analyses.stream import POLICIES, shift_keys, stream_nll
from sinkscope.errors import SinkscopeError
from sinkscope.models import tiny_model


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def test_no_eviction_equals_full_forward(lm):
    ids = lm.tokenizer("To be, or not to be")["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].float()
    expected = -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    for policy in POLICIES:  # budget 4 + 64 > length: nothing is evicted
        got = stream_nll(lm, ids, policy, sink=4, window=64).nll
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_rope_shift_matches_direct_rotation(lm):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = lm.model.model.rotary_emb
    torch.manual_seed(0)
    raw = torch.randn(1, 2, 5, 8)  # [b, kvh, n, d] un-rotated keys
    positions = torch.arange(10, 15)[None]
    cos, sin = rotary(raw, positions)
    _, at_p = apply_rotary_pos_emb(raw, raw, cos, sin)
    cos3, sin3 = rotary(raw, positions - 3)
    _, at_p_minus_3 = apply_rotary_pos_emb(raw, raw, cos3, sin3)
    torch.testing.assert_close(shift_keys(at_p, -3, lm), at_p_minus_3, atol=1e-5, rtol=0)


def test_eviction_by_hand():
    """In a 1-layer model cached keys/values depend only on token and position, so after eviction the sink + window
    cache must equal a fresh forward over [sinks + window] at positions 0..n-1 (deeper layers' cached entries also
    carry their older context, which is the point of StreamingLLM, so they are not comparable this way)."""
    lm = tiny_model("llama", num_hidden_layers=1)
    ids = lm.tokenizer("abcdefghijklmnop")["input_ids"]
    sink, window = 2, 5
    got = stream_nll(lm, ids, "sink_window", sink=sink, window=window).nll
    for t in range(sink + window, len(ids) - 1):
        # the cache before feeding x_t holds x_0..x_{sink-1} and the `window` tokens before t
        context = ids[:sink] + ids[t - window : t] + [ids[t]]
        with torch.no_grad():
            logits = lm.model(torch.tensor([context])).logits[0, -1].float()
        expected = -torch.log_softmax(logits, -1)[ids[t + 1]]
        torch.testing.assert_close(got[t], expected, atol=1e-4, rtol=0)


def test_window_differs_from_sinks_after_eviction(lm):
    ids = lm.tokenizer("the quick brown fox jumps over")["input_ids"]
    a = stream_nll(lm, ids, "sink_window", sink=2, window=6).nll
    b = stream_nll(lm, ids, "window", sink=2, window=6).nll
    assert torch.allclose(a[:8], b[:8], atol=1e-4) and not torch.allclose(a[9:], b[9:], atol=1e-3)


def test_bad_input(lm):
    with pytest.raises(SinkscopeError, match="policy"):
        stream_nll(lm, [1, 2, 3], "lru")
    with pytest.raises(SinkscopeError, match="too short"):
        stream_nll(lm, [1], "full")
    with pytest.raises(SinkscopeError, match="rotary"):
        stream_nll(tiny_model("gpt2"), [1, 2, 3], "window")


def test_beyond_the_context_equals_a_fresh_forward_of_sinks_and_window():
    """A text 4× the model's context streams: positions are rebased below the context, and in a 1-layer model each
    step still equals a fresh forward over [sinks + window + x_t] at positions 0..n−1 (StreamingLLM's frame)."""
    lm = tiny_model("llama", num_hidden_layers=1, max_position_embeddings=16)
    ids = lm.tokenizer("the quick brown fox jumps over the lazy dog, then naps; " * 2)["input_ids"][:64]
    sink, window = 2, 5
    result = stream_nll(lm, ids, "sink_window", sink=sink, window=window)
    assert result.n_tokens == 64
    for t in range(sink + window, len(ids) - 1):
        context = ids[:sink] + ids[t - window : t] + [ids[t]]
        with torch.no_grad():
            logits = lm.model(torch.tensor([context])).logits[0, -1].float()
        expected = -torch.log_softmax(logits, -1)[ids[t + 1]]
        torch.testing.assert_close(result.nll[t], expected, atol=1e-4, rtol=0)
    full = stream_nll(lm, ids, "full", sink=sink, window=window)
    assert full.n_tokens == 16  # the full cache is scored only within the context
    with pytest.raises(SinkscopeError, match="context"):
        stream_nll(lm, ids, "window", sink=4, window=12)


def test_sink_keys_stay_one_rotation_from_exact_in_bfloat16(lm):
    """Each step places the sinks by one rotation of their first keys, so in bfloat16 their error stays at one
    rounding after hundreds of evictions; rotating step by step (the original re-positioning) drifts."""
    from types import SimpleNamespace

    from sinkscope.analyses.stream import _SinkWindowCache

    torch.manual_seed(0)
    first = torch.randn(1, 2, 2, 8)  # [b, kvh, sink, d] float32, as first computed
    layer = SimpleNamespace(keys=torch.cat([first, torch.randn(1, 2, 6, 8)], 2).bfloat16(),
                            values=torch.zeros(1, 2, 8, 8, dtype=torch.bfloat16))
    book = _SinkWindowCache(lm, SimpleNamespace(layers=[layer]), sink=2, budget=8)
    stepwise = first.bfloat16()
    for t in range(8, 260):
        book.place_sinks(t)
        if t > 8:
            stepwise = shift_keys(stepwise, 1, lm)
    exact = shift_keys(first.double(), 260 - 1 - 8, lm)
    error = ((layer.keys[:, :, :2].double() - exact).norm() / exact.norm()).item()
    drift = ((stepwise.double() - exact).norm() / exact.norm()).item()
    assert error < 0.01 < 0.05 < drift


def test_stream_cli_on_a_text_longer_than_the_context(tmp_path):
    """sinkscope-tiny's context is 256 tokens: the evicting caches stream the whole text, the full cache stops at the
    context and says so, and the tokens table pads it with NaN."""
    from typer.testing import CliRunner

    from sinkscope.cli.app import app
    from sinkscope.store import load_run

    text = tmp_path / "long.txt"
    text.write_text("Attention sinks are tokens that draw attention while carrying little meaning. " * 40)
    res = CliRunner().invoke(app, ["stream", "--model", "sinkscope-tiny", "--text-file", str(text), "--sink", "4",
                                   "--window", "16", "--max-tokens", "300", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "first 256 tokens only" in res.output
    run = load_run(tmp_path / "run")
    ppl = run["perplexity"].set_index("policy")
    assert ppl.loc["full", "n_tokens"] == 256 and ppl.loc["window", "n_tokens"] == 300
    tokens = run["tokens"]
    assert len(tokens) == 299 and tokens["nll_full"].isna().sum() == 299 - 255
    assert tokens["nll_sink_window"].notna().all()


@pytest.mark.slow
def test_stream_cli_four_contexts_window_only_loses_after_eviction(tmp_path, shared):
    """Issue #16's check: `sinkscope stream --model sinkscope-tiny --text FILE --sink 4 --window 64 --max-tokens
    1024` streams a text of 4× the model's context; the full cache stops at the context; once the first tokens are
    evicted, the window-only cache's perplexity is worse than sink + window's (StreamingLLM's result, on a model with
    a first-token sink)."""
    import json

    from typer.testing import CliRunner

    from sinkscope.cli.app import app
    from sinkscope.store import load_run

    source = shared / "data" / "tiny_shakespeare" / "test.jsonl"
    if not source.exists():
        pytest.skip("needs ../shared/data/tiny_shakespeare")
    text = tmp_path / "long.txt"
    text.write_text(" ".join(json.loads(line)["text"] for line in source.read_text().splitlines()[:2]))
    res = CliRunner().invoke(app, ["stream", "--model", "sinkscope-tiny", "--text", str(text), "--sink", "4",
                                   "--window", "64", "--max-tokens", "1024", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    ppl = load_run(tmp_path / "run")["perplexity"].set_index("policy")
    assert ppl.loc["full", "n_tokens"] == 256  # the model's context, said so in the output
    assert "first 256 tokens only" in res.output
    assert ppl.loc["sink_window", "n_tokens"] == ppl.loc["window", "n_tokens"] == 1024  # 4× the context
    assert ppl.loc["window", "ppl_after"] > ppl.loc["sink_window", "ppl_after"]
