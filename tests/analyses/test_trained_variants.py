"""Training-time mitigations in the benchmark (#18 item 4): the prompt sink share and loss against eager attention and
a plain forward pass, variants trained on one budget, their rows, and `bench-mitigation --trained-variants`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from sinkscope.analyses.calibrate import mitigation_benchmark, predict
from sinkscope.analyses.evaluate import get_spec, load_examples
from sinkscope.analyses.trained import prompt_sinks, train_variants, variant_rows
from sinkscope.capture import MaskKeys
from sinkscope.models import tiny_model
from sinkscope.toy.tinylm import attention_stats, eval_batch, prepare_data, saved_config

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "see", "big", "red", "small", "house",
         "tree", "river", "king", "queen", "said", "why", "how", "when", "what", "is", "was", "will", "be", "not",
         "very", "good", "film", "fun", "dull", "long", "warm"]
ROWS = [("a lovely, warm film", "positive"), ("dull and far too long", "negative"), ("great fun", "positive"),
        ("a mess", "negative"), ("moving and funny", "positive"), ("boring", "negative")]
TINY = dict(d_model=32, layers=2, heads=2, seq_len=16, batch_size=4, vocab_size=300, eval_batch=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    rng = random.Random(0)
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(150)) + "."}) + "\n"
                            for _ in range(40)))
    sst2 = root / "sst2.jsonl"
    sst2.write_text("".join(json.dumps({"id": str(i), "text": t, "label": y}) + "\n" for i, (t, y) in enumerate(ROWS)))
    return text, sst2


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    text, _ = files
    return train_variants(["softmax", "off_by_one", "gated"], text, tmp_path_factory.mktemp("runs"), steps=6,
                          **TINY)


def _eager(lm, prompts):
    """α₀ (mean over queries i ≥ 1, layers, heads, then prompts) and the token-weighted next-token loss, by plain eager
    transformers on each prompt alone."""
    model = LlamaForCausalLM.from_pretrained(lm, attn_implementation="eager").eval() if isinstance(lm, str) else lm
    alphas, nll, count = [], 0.0, 0
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model(ids, labels=ids, output_attentions=True)
        alphas.append(torch.stack([a[0, :, 1:, 0].mean(-1) for a in out.attentions]).mean())
        nll += float(out.loss) * (len(p) - 1)
        count += len(p) - 1
    return float(torch.stack(alphas).mean()), nll / count


def test_prompt_sinks_equal_eager_attention(tmp_path):
    lm = tiny_model("llama")
    prompts = [lm.tokenizer(t)["input_ids"] for t in ("The cat sat on the mat.", "A dog", "Why is the river so cold?")]
    lm.model.save_pretrained(tmp_path)
    alpha, loss = _eager(str(tmp_path), prompts)
    got = prompt_sinks(lm, prompts, batch_size=2)
    assert got["sink_share"] == pytest.approx(alpha, abs=1e-5)
    assert got["loss"] == pytest.approx(loss, abs=1e-4)
    assert got["null_mass"] == 0.0
    masked = prompt_sinks(lm, prompts, [MaskKeys(positions=[0])], batch_size=2)
    assert masked["sink_share"] == pytest.approx(0.0, abs=1e-7) and masked["loss"] != pytest.approx(loss)


def test_variants_train_on_one_budget(trained):
    assert [t.variant for t in trained] == ["softmax", "off_by_one", "gated"]
    configs = [saved_config(t.run) for t in trained]
    for cfg in configs:  # the same data, steps, seed and architecture; only the attention differs
        assert {**cfg.__dict__, "variant": "", "out": ""} == {**configs[0].__dict__, "variant": "", "out": ""}
    assert [c.variant for c in configs] == ["softmax", "off_by_one", "gated"]
    soft = trained[0]
    assert soft.steps == 6
    data = prepare_data(configs[0], soft.run / "tokenizer", with_pool=False)
    stats = attention_stats(soft.loaded.model, eval_batch(configs[0], data))
    assert soft.heldout_loss == pytest.approx(stats.loss, abs=1e-6)
    assert soft.heldout_sink_share == pytest.approx(float(stats.alpha0().mean()), abs=1e-6)


def test_variant_rows(trained, files):
    _, sst2 = files
    spec = get_spec("sst2")
    examples = load_examples(spec, sst2).examples
    rows = variant_rows(trained, spec, examples, batch_size=4).set_index("method")
    assert list(rows.index) == ["trained_softmax", "trained_off_by_one", "trained_gated"]
    assert set(rows["kind"]) == {"training"}
    gold = torch.tensor([ex.label_id for ex in examples])
    for tv in trained:
        acc = float((predict(tv.loaded, spec, examples, batch_size=4) == gold).float().mean())
        assert rows.loc[f"trained_{tv.variant}", "accuracy"] == pytest.approx(acc)
    # the trained softmax model, loaded by plain transformers with eager attention, gives the row's α₀ and loss
    soft = next(tv for tv in trained if tv.variant == "softmax")
    ids = [list(soft.loaded.tokenizer(spec.prompt(ex.fields))["input_ids"]) for ex in examples]
    alpha, loss = _eager(str(soft.run / "model"), ids)
    assert rows.loc["trained_softmax", "sink_share"] == pytest.approx(alpha, abs=1e-5)
    assert rows.loc["trained_softmax", "loss"] == pytest.approx(loss, abs=1e-4)
    # off-by-one gives part of each row to its zero logit; softmax and gated attention give none
    assert rows.loc["trained_off_by_one", "null_mass"] > 0.01
    assert rows.loc["trained_softmax", "null_mass"] == rows.loc["trained_gated", "null_mass"] == 0.0
    assert rows.loc["trained_softmax", "changed_predictions"] == 0.0
    assert rows.loc["trained_softmax", "cost_vs_none"] == pytest.approx(1.0)
    assert (rows["train_steps"] == 6).all() and rows["heldout_loss"].notna().all()


def test_benchmark_forward_rows_carry_sink_columns(files):
    _, sst2 = files
    lm = tiny_model("llama")
    spec = get_spec("sst2")
    examples = load_examples(spec, sst2).examples
    table = mitigation_benchmark(lm, spec, examples, alignment=None, batch_size=4).set_index("method")
    prompts = [lm.tokenizer(spec.prompt(ex.fields))["input_ids"] for ex in examples]
    assert table.loc["none", "sink_share"] == pytest.approx(prompt_sinks(lm, prompts)["sink_share"], abs=1e-7)
    assert table.loc["mask_pos0", "sink_share"] == pytest.approx(0.0, abs=1e-7)
    assert table[["sink_share", "loss"]].notna().all().all()


def test_bench_mitigation_trained_variants_command(files, tmp_path, monkeypatch):
    from sinkscope.cli import mitigation as mitigation_cli
    from sinkscope.cli.app import app
    from sinkscope.store import load_run

    text, sst2 = files
    monkeypatch.setattr(mitigation_cli.console, "width", 250)
    out = tmp_path / "bench"
    args = ["bench-mitigation", "-m", "tiny:llama", "--dataset", "sst2", "--data", str(sst2), "--limit", "6",
            "--trained-variants", "softmax,sink_logit", "--train-steps", "2", "--train-data", str(text),
            "--train-out", str(tmp_path / "runs"), "--out", str(out)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "trained_sink_logit" in result.output and "training-time" in result.output
    table = load_run(out).tables["mitigation"]
    assert table["kind"].tolist()[-2:] == ["training", "training"]
    assert table["method"].tolist()[-2:] == ["trained_softmax", "trained_sink_logit"]
    assert (tmp_path / "runs" / "sink_logit" / "model" / "config.json").exists()
    again = CliRunner().invoke(app, args[:-2], catch_exceptions=False)  # the finished runs are reused
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(app, ["bench-mitigation", "-m", "tiny:llama", "-d", "sst2", "--data", str(sst2),
                                   "--trained-variants", "softmax,linear"])
    assert bad.exit_code == 2 and "linear" in bad.output
