"""KV-cache fake quantisation: the quantisers against a direct numpy round-trip, the cache's NLL against a plain
forward and a hand-built quantised cache, and the keep policies."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from sinkscope.analyses.kvquant import (
    Condition,
    kv_quant,
    kv_quant_nll,
    quantize_keys,
    quantize_values,
)
from sinkscope.errors import SinkscopeError
from sinkscope.models import tiny_model


def roundtrip(x: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Asymmetric min-max quantise → dequantise along `axis`, written directly (float32, as the cache computes)."""
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    step = (hi - lo) / np.float32(2**bits - 1)
    safe = np.where(step > 0, step, np.float32(1))
    q = np.clip(np.rint((x - lo) / safe), 0, 2**bits - 1)
    return np.where(step > 0, q * safe + lo, x).astype(np.float32)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def kv() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 8)  # [batch, head, token, channel]
    x[:, :, 0] *= 30  # an outlier token, as a sink's key often is
    return x


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_keys_match_a_direct_per_channel_roundtrip(kv, bits):
    got = quantize_keys(kv, bits, group=16).numpy()
    x = kv.numpy()
    for start in range(0, 40, 16):  # groups [0, 16), [16, 32), [32, 40)
        want = roundtrip(x[:, :, start : start + 16], bits, axis=2)
        np.testing.assert_allclose(got[:, :, start : start + 16], want, rtol=0, atol=1e-6)
        span = x[:, :, start : start + 16].max(2, keepdims=True) - x[:, :, start : start + 16].min(2, keepdims=True)
        err = np.abs(got[:, :, start : start + 16] - x[:, :, start : start + 16])
        assert (err <= span / (2**bits - 1) / 2 * (1 + 1e-5) + 1e-6).all()  # at most half a step


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_values_match_a_direct_per_token_roundtrip(kv, bits):
    got = quantize_values(kv, bits).numpy()
    x = kv.numpy()
    np.testing.assert_allclose(got, roundtrip(x, bits, axis=3), rtol=0, atol=1e-6)
    span = x.max(3, keepdims=True) - x.min(3, keepdims=True)
    assert (np.abs(got - x) <= span / (2**bits - 1) / 2 * (1 + 1e-5) + 1e-6).all()


def test_sixteen_bits_is_exact_and_rows_take_their_own_bits(kv):
    assert torch.equal(quantize_keys(kv, 16), kv) and torch.equal(quantize_values(kv, 16), kv)
    mixed = quantize_values(kv, torch.tensor([16, 2]))
    assert torch.equal(mixed[0], kv[0]) and torch.equal(mixed[1], quantize_values(kv[1:], 2)[0])


def test_kept_positions_are_untouched_and_left_out_of_the_range(kv):
    keep = torch.zeros(40, dtype=torch.bool)
    keep[0] = True
    keys = quantize_keys(kv, 2, group=16, keep=keep)
    assert torch.equal(keys[:, :, 0], kv[:, :, 0])
    # the rest of group 0 is quantised over its own range (the outlier left out); the other groups as if none kept
    want = roundtrip(kv[:, :, 1:16].numpy(), 2, axis=2)
    np.testing.assert_allclose(keys[:, :, 1:16].numpy(), want, rtol=0, atol=1e-6)
    assert torch.equal(keys[:, :, 16:], quantize_keys(kv, 2, group=16)[:, :, 16:])
    # per-token values: kept tokens are untouched, every other token as if nothing were kept
    values = quantize_values(kv, 2, keep=keep)
    assert torch.equal(values[:, :, 0], kv[:, :, 0])
    assert torch.equal(values[:, :, 1:], quantize_values(kv, 2)[:, :, 1:])
    # leaving the outlier out narrows the range: a smaller error on its group
    assert (keys[:, :, 1:16] - kv[:, :, 1:16]).abs().mean() < (quantize_keys(kv, 2, 16) - kv)[:, :, 1:16].abs().mean()


def _plain_nll(lm, ids):
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].float()
    return -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [1, 5])
def test_sixteen_bits_equals_the_plain_forward(lm, chunk):
    ids = lm.tokenizer("To be, or not to be, that is the question")["input_ids"]
    got = kv_quant_nll(lm, ids, [Condition(16, "none"), Condition(16, "first", (0, 1))], chunk=chunk, group=4)
    expected = _plain_nll(lm, ids)
    torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], expected, atol=1e-4, rtol=0)


def test_token_by_token_equals_a_hand_built_quantised_cache():
    """A 1-layer model: the cached K/V of a token depend only on it and its position, so the NLL at step t under the
    quantised cache is a plain attention over [the quantised K/V of x_<t (quantiser applied directly to a fresh
    forward's K/V), x_t's exact K/V] — computed here with the model's own layer via a DynamicCache filled by hand."""
    from transformers import DynamicCache

    lm = tiny_model("llama", num_hidden_layers=1)
    ids = lm.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"][:14]
    bits, group = 2, 4
    got = kv_quant_nll(lm, ids, [Condition(bits, "none")], chunk=1, group=group)[0]
    with torch.no_grad():
        arg = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
        full = DynamicCache(config=lm.model.config)
        lm.model(torch.tensor([ids]), use_cache=True, **{arg: full})
        k, v = full.layers[0].keys, full.layers[0].values  # [1, kvh, T, d] exact
        for t in range(1, len(ids) - 1):
            done = t - t % group  # keys of complete groups are quantised; the rest wait in full precision
            keys = torch.cat([quantize_keys(k[:, :, :done], bits, group), k[:, :, done:t]], 2)
            cache = DynamicCache(config=lm.model.config)
            cache.update(keys, quantize_values(v[:, :, :t], bits), 0)
            logits = lm.model(torch.tensor([[ids[t]]]), position_ids=torch.tensor([[t]]), use_cache=True,
                              **{arg: cache}).logits[0, -1].float()
            torch.testing.assert_close(got[t], -torch.log_softmax(logits, -1)[ids[t + 1]], atol=1e-4, rtol=0)


def test_keep_all_positions_equals_no_quantisation_and_fewer_bits_hurt(lm):
    ids = lm.tokenizer("Attention sinks draw attention while carrying little meaning, so they say.")["input_ids"]
    every = tuple(range(len(ids)))
    got = kv_quant_nll(lm, ids, [Condition(16, "none"), Condition(2, "first", every), Condition(2, "none"),
                                 Condition(8, "none")], chunk=3, group=4)
    torch.testing.assert_close(got[1], got[0], atol=1e-5, rtol=0)
    assert not torch.allclose(got[2], got[0], atol=1e-3)
    assert (got[3] - got[0]).abs().mean() < (got[2] - got[0]).abs().mean()


def test_sink_window_at_sixteen_bits_equals_the_stream_cache():
    from sinkscope.analyses.stream import stream_nll

    lm = tiny_model("llama", num_hidden_layers=1)
    ids = lm.tokenizer("abcdefghijklmnopqrstuvwxyz")["input_ids"]
    got = kv_quant_nll(lm, ids, [Condition(16, "none")], cache="sink_window", sink=2, window=6, group=3, chunk=1)
    torch.testing.assert_close(got[0], stream_nll(lm, ids, "sink_window", sink=2, window=6).nll, atol=1e-4, rtol=0)


def test_kv_quant_tables(lm):
    ids = lm.tokenizer("The cat sat on the mat and the dog sat on the log, " * 3)["input_ids"][:40]
    result = kv_quant(lm, ids, bits=(4, 2), keep_first=2, sink=2, window=8, group=4, chunk=4, prefix=20)
    table = result.tables["kvquant"]
    assert len(table) == 2 * (1 + 2 * 3)
    assert set(table["keep"]) == {"none", "sinks", "first"} and set(table["cache"]) == {"full", "sink_window"}
    base = table[table["bits"] == 16].set_index("cache")
    assert np.allclose(base["ppl_ratio"], 1.0)
    first = table[table["keep"] == "first"]
    assert (first["kept"] == "0 1").all() and (first["n_kept"] == 2).all()
    tokens = result.tables["tokens"]
    assert {"prompt_id", "position", "token"} <= set(tokens.columns) and len(tokens) == 2 * 7 * 39
    means = tokens.groupby(["cache", "bits", "keep"])["nll"].mean()
    for row in table.itertuples():
        assert means[row.cache, row.bits, row.keep] == pytest.approx(row.nll, abs=1e-6)
    kept = result.tables["kept"]
    assert set(kept.columns) >= {"prompt_id", "position", "token", "keep"}
    sinks = kept[kept["keep"] == "sinks"]["position"].tolist()
    row = table[(table["keep"] == "sinks") & (table["bits"] == 2)].iloc[0]
    assert row["kept"] == " ".join(map(str, sinks))


def test_bad_input(lm):
    with pytest.raises(SinkscopeError, match="cache"):
        kv_quant_nll(lm, [1, 2, 3], [Condition(4, "none")], cache="lru")
    with pytest.raises(SinkscopeError, match="group"):
        kv_quant_nll(lm, list(range(1, 40)), [Condition(4, "none")], cache="sink_window", window=8, group=16)
    with pytest.raises(SinkscopeError, match="bits"):
        quantize_values(torch.zeros(1, 1, 2, 2), 0)
    with pytest.raises(SinkscopeError, match="rotary"):
        kv_quant_nll(tiny_model("gpt2"), [1, 2, 3], [Condition(4, "none")], cache="sink_window", window=2, group=1)


def test_kv_quant_cli_writes_tables_figure_and_report(tmp_path):
    """The command end to end on sinkscope-tiny: the printed table, a run folder with the three tables (shared key
    columns), the curve listed in the manifest, and the report section built from the folder."""
    from typer.testing import CliRunner

    from sinkscope.cli.app import app
    from sinkscope.report.page import write_report
    from sinkscope.store import load_run

    text = tmp_path / "text.txt"
    text.write_text("Attention sinks are tokens that draw attention while carrying little meaning. " * 8)
    res = CliRunner().invoke(app, ["kv-quant", "--model", "sinkscope-tiny", "--text-file", str(text), "--bits", "4,2",
                                   "--sink", "2", "--window", "16", "--group", "8", "--chunk", "8", "--max-tokens",
                                   "64", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "detected sinks" in res.output and "sink_window" in res.output
    run = load_run(tmp_path / "run")
    assert len(run["kvquant"]) == 2 * 7 and {"prompt_id", "position", "token"} <= set(run["tokens"].columns)
    assert "kvquant.png" in run.manifest["files"]
    page = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "KV-cache quantisation" in page and "detected sinks kept" in page
    bad = CliRunner().invoke(app, ["kv-quant", "--model", "sinkscope-tiny", "--text-file", str(text), "--bits", "4,x"])
    assert bad.exit_code == 2 and "--bits" in bad.output
