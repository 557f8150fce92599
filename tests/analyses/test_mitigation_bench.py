"""The mitigation benchmark's rows: forward-pass reweighting of detected sinks against a hand-made forward pass,
interpretation-only DMR rows against `evaluate` on the same examples, ACT's sinks independent of padding, and the
`bench-mitigation` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from typer.testing import CliRunner

from conftest import SHARED
from sinkscope.analyses.calibrate import ALIGNMENT, Calibration, mitigation_benchmark, predict
from sinkscope.analyses.evaluate import evaluate, get_spec, label_token_ids, load_examples, prompt_pass
from sinkscope.analyses.evaluate.classify import next_token_logprobs
from sinkscope.analyses.evaluate.run import causal_subset
from sinkscope.capture import Calibrate, ReweightSinks, intervene
from sinkscope.errors import SinkscopeError
from sinkscope.models import tiny_model

DATA = SHARED / "data"
ROWS = [("a lovely, warm film", "positive"), ("dull and far too long", "negative"), ("great fun", "positive"),
        ("a mess", "negative"), ("moving and funny", "positive"), ("boring", "negative"),
        ("the sentiment is negative", "negative")]
TEXT = ["The cat sat on the mat, twice, and then it sat again."]
GAMMA, ALPHA = 0.3, 1.5


def _manual_reweighted_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Independent eager attention with seed 000 eq. (1) on z-score sinks written out: per row, μ and σ over the
    visible keys, w = γ where (A − μ)/σ > α, A' = A·w / Σ A·w."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    probs = torch.softmax((query @ k.transpose(-1, -2) * scaling + attention_mask).float(), dim=-1)
    visible = (attention_mask > torch.finfo(attention_mask.dtype).min / 2).expand_as(probs)
    n = visible.sum(-1, keepdim=True)
    mu = torch.where(visible, probs, 0).sum(-1, keepdim=True) / n
    sigma = (torch.where(visible, (probs - mu) ** 2, 0).sum(-1, keepdim=True) / n).sqrt()
    sinks = visible & (sigma > 0) & ((probs - mu) / sigma.clamp(min=1e-30) > ALPHA)
    weighted = probs * torch.where(sinks, GAMMA, 1.0)
    probs = weighted / weighted.sum(-1, keepdim=True)
    return (probs.to(query.dtype) @ v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("manual_reweighted", _manual_reweighted_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("manual_reweighted", eager_mask)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sst2.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": t, "label": y}) + "\n" for i, (t, y) in enumerate(ROWS)))
    spec = get_spec("sst2")
    return tiny_model("llama"), spec, load_examples(spec, path).examples, path


def _manual(lm):
    """The model switched to the hand-made reweighted attention (a context manager)."""
    class Switch:
        def __enter__(self):
            self.previous = lm.model.config._attn_implementation
            lm.model.set_attn_implementation("manual_reweighted")

        def __exit__(self, *exc):
            lm.model.set_attn_implementation(self.previous)

    return Switch()


def test_reweight_sinks_by_hand():
    # 9 keys: μ = 1/9, σ = 0.173, z(0.6) = 2.83 > 2 is the only sink; γ = 0.5 → [0.3, 0.05 × 8] / 0.7
    probs = torch.tensor([0.6] + [0.05] * 8)[None, None, None]
    out = ReweightSinks(gamma=0.5)(probs, 0, torch.zeros(1, 1, 1, 9))
    torch.testing.assert_close(out, torch.tensor([0.3] + [0.05] * 8)[None, None, None] / 0.7)
    with pytest.raises(SinkscopeError):
        ReweightSinks(gamma=-1.0)
    with pytest.raises(SinkscopeError):
        ReweightSinks(method="column_mass")


def test_reweight_sinks_equals_manual_forward(setup):
    lm, *_ = setup
    enc = lm.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        plain = lm.model(**enc).logits
        with intervene(lm.model, ReweightSinks(gamma=GAMMA, params={"alpha": ALPHA})):
            got = lm.model(**enc).logits
        with _manual(lm):
            expected = lm.model(**enc).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-3)  # sinks were found and reweighted


def test_reweight_predictions_equal_manual_forward(setup):
    lm, spec, examples, _ = setup
    labels = label_token_ids(lm.tokenizer, spec.labels, spec.answer_prefix)
    by_hand = []
    with torch.no_grad(), _manual(lm):
        for ex in examples:  # summed log-probability of each verbaliser, one unpadded sequence at a time
            prompt = list(lm.tokenizer(spec.prompt(ex.fields))["input_ids"])
            scores = []
            for label in labels:
                logits = lm.model(torch.tensor([prompt + label[:-1]])).logits[0].float()
                logprobs = torch.log_softmax(logits[len(prompt) - 1 :], -1)
                scores.append(float(logprobs[torch.arange(len(label)), torch.tensor(label)].sum()))
            by_hand.append(max(range(len(scores)), key=scores.__getitem__))
    got = predict(lm, spec, examples, [ReweightSinks(gamma=GAMMA, params={"alpha": ALPHA})], batch_size=3)
    assert got.tolist() == by_hand


@pytest.mark.parametrize("side", ["right", "left"])
def test_next_token_logprobs_equal_prompt_pass(setup, side):
    lm, spec, examples, _ = setup
    prompts = [lm.tokenizer(spec.prompt(ex.fields))["input_ids"] for ex in examples[:4]]
    expected = prompt_pass(lm, prompts, side).logprobs
    torch.testing.assert_close(next_token_logprobs(lm, prompts, side), expected, atol=1e-5, rtol=0)


def test_act_sinks_do_not_depend_on_padding(setup):
    lm, *_ = setup
    short, long = lm.tokenizer(["Hi there, cat"])["input_ids"][0], lm.tokenizer(TEXT)["input_ids"][0]
    ids = torch.tensor([long, short + [0] * (len(long) - len(short))])
    mask = torch.tensor([[1] * len(long), [1] * len(short) + [0] * (len(long) - len(short))])
    calib = Calibrate(beta=0.4, threshold=0.05)
    with torch.no_grad(), intervene(lm.model, calib):
        alone = lm.model(torch.tensor([short])).logits[0]
        sinks_alone = {layer: s.clone() for layer, s in calib._sinks.items()}
        batched = lm.model(input_ids=ids, attention_mask=mask).logits[1, : len(short)]
    for layer, sinks in sinks_alone.items():
        assert torch.equal(calib._sinks[layer][1, :, : len(short)], sinks[0])
    assert any(bool(s.any()) for s in sinks_alone.values())  # the test calibrates something
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_benchmark_rows(setup):
    lm, spec, examples, _ = setup
    table = mitigation_benchmark(lm, spec, examples, Calibration(heads={1: [0]}), gammas=(1.0, 0.0), batch_size=4)
    assert table["method"].tolist() == ["none", "mask_pos0", "reweight_zscore_1", "reweight_zscore_0", "act_all",
                                        "act_searched", "dmr_zscore", "dmr_entropy_delta"]
    rows = table.set_index("method")
    assert rows.loc["none", "kind"] == "baseline" and set(rows["kind"]) == {"baseline", "forward", "interpretation"}
    # γ = 1 is the identity; DMR reads the attention afterwards and changes no prediction
    for name in ("reweight_zscore_1", "dmr_zscore", "dmr_entropy_delta"):
        assert rows.loc[name, "accuracy"] == rows.loc["none", "accuracy"]
        assert rows.loc[name, "changed_predictions"] == 0.0
    assert (table["ms_per_example"] > 0).all() and (rows.loc[["dmr_zscore", "dmr_entropy_delta"], "dmr_ms"] > 0).all()
    forward = rows[rows["kind"] == "forward"]
    assert forward[["mismatch", "match", "spearman", "topk_overlap"]].isna().all().all()
    assert (table["n_causal"] == 0).all()  # ALIGNMENT measures no causal effects
    assert not math.isnan(rows.loc["none", "match"]) or not math.isnan(rows.loc["none", "mismatch"])
    bare = mitigation_benchmark(lm, spec, examples, alignment=None)
    assert bare["method"].tolist() == ["none", "mask_pos0", "reweight_zscore_0.4", "act_all"]


def test_alignment_columns_equal_evaluate(setup):
    lm, spec, examples, path = setup
    config = ALIGNMENT.__class__(**{**ALIGNMENT.__dict__, "causal": True, "causal_limit": 3})
    table = mitigation_benchmark(lm, spec, examples, batch_size=4, alignment=config,
                                 causal_ids=causal_subset(examples, 3, seed=0)).set_index("method")
    summary = evaluate(lm, spec, data=path, methods=["zscore", "entropy_delta"], causal_limit=3, seed=0,
                       batch_size=4).summary.set_index("variant")
    assert table.loc["none", "accuracy"] == pytest.approx(summary.loc["before", "accuracy"])
    for method, variant in (("none", "before"), ("dmr_zscore", "zscore"), ("dmr_entropy_delta", "entropy_delta")):
        for col in ("mismatch", "match", "spearman", "topk_overlap"):
            assert table.loc[method, col] == pytest.approx(summary.loc[variant, col], abs=1e-9, nan_ok=True), col
        assert table.loc[method, "n_causal"] == summary.loc[variant, "n_causal"] == 3


@pytest.mark.skipif(not DATA.is_dir(), reason=f"offline data copies not found at {DATA} (../shared/data)")
def test_bench_mitigation_command(tmp_path, monkeypatch):
    from sinkscope.cli import mitigation as mitigation_cli
    from sinkscope.cli.app import app
    from sinkscope.store import load_run

    monkeypatch.setattr(mitigation_cli.console, "width", 250)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench-mitigation", "-m", "tiny:llama", "--dataset", "sst2", "--limit", "6",
                                      "--gamma", "0", "--causal-limit", "2", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "dmr_entropy_delta" in result.output and "reweight_zscore_0" in result.output
    assert "change no prediction" in " ".join(result.output.split())
    table = load_run(out).tables["mitigation"].set_index("method")
    assert table.loc["dmr_zscore", "n_causal"] == 2 and table.loc["none", "n"] == 6
