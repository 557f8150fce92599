"""Dataset specs (seed 000 Table 1), loaders with bad rows, seeded sampling, and the offline copies in ../shared."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import SHARED
from sinkscope.analyses.evaluate.datasets import SPECS, get_spec, list_datasets, load_examples, sample
from sinkscope.errors import SinkscopeError

DATA = SHARED / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"offline data copies not found at {DATA} (../shared/data)")

TABLE1 = {  # seed 000 Table 1 label sets (TREC's abbreviations written out, as in ACT)
    "sst2": {"positive", "negative"},
    "sst5": {"terrible", "negative", "neutral", "positive", "great"},
    "mr": {"positive", "negative"},
    "subj": {"subjective", "objective"},
    "agnews": {"World", "Sports", "Business", "Technology"},
    "trec": {"Description", "Entity", "Expression", "Person", "Number", "Location"},
    "cb": {"Yes", "No", "Maybe"},
    "boolq": {"True", "False"},
}


def test_specs_follow_table1():
    assert list_datasets() == ["sst2", "sst5", "mr", "subj", "dbpedia", "agnews", "trec", "cb", "boolq"]
    for name, labels in TABLE1.items():
        assert set(SPECS[name].labels) == labels
    assert len(SPECS["dbpedia"].labels) == 14 and SPECS["dbpedia"].labels[0] == "company"
    assert SPECS["sst2"].keywords == {"classify", "sentiment", "positive", "negative"}  # seed 000 §2.1
    for spec in SPECS.values():
        assert {label.casefold() for label in spec.labels} <= spec.keywords
        assert spec.hub is not None and len(spec.hub.labels) == len(spec.labels)
        assert set(spec.hub.labels) == set(spec.labels)


def test_prompt_template():
    spec = get_spec("SST-2")
    prompt = spec.prompt({"text": "a charming film ."})
    assert prompt == ("Classify the sentiment of the sentence as 'positive' or 'negative'.\n"
                      "Sentence: a charming film .\nSentiment:")
    cb = get_spec("cb").prompt({"premise": "It rained.", "hypothesis": "The ground is wet"})
    assert "Premise: It rained.\nHypothesis: The ground is wet\nAnswer:" in cb
    with pytest.raises(SinkscopeError, match="unknown dataset 'imdb'"):
        get_spec("imdb")


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_skipped_with_their_row_number(tmp_path):
    path = _write_jsonl(tmp_path / "sst2.jsonl", [
        {"id": "a", "text": "good", "label": "positive"},
        {"id": "b", "label": "negative"},  # no text
        {"id": "c", "text": "meh", "label": "so-so"},  # unknown label
        {"id": "d", "text": "   ", "label": "negative"},  # empty text
        "{not json",
        {"id": "a", "text": "again", "label": "positive"},  # repeated id
        {"id": "g", "text": "bad", "label": 0},  # label index
        {"text": "no id", "label": "POSITIVE"},  # any case; id from the row
    ])
    result = load_examples("sst2", path)
    assert [x.id for x in result.examples] == ["a", "g", "sst2-00008"]
    assert [x.label_id for x in result.examples] == [1, 0, 1]
    reasons = {s.row: s.reason for s in result.skipped}
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert reasons[2].startswith("row 2 (id b): missing column 'text'")
    assert "unknown label 'so-so'" in reasons[3] and "positive" in reasons[3]
    assert "empty 'text'" in reasons[4]
    assert "invalid JSON" in reasons[5]
    assert "repeats an earlier id" in reasons[6]


def test_csv_and_folder_layouts(tmp_path):
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb.csv").write_text('premise,hypothesis,label\n"It rained, a lot.",The ground is wet,Yes\n'
                                     "It was dry.,,No\n")
    result = load_examples("cb", tmp_path)  # cb/test.jsonl absent: falls back to cb.csv
    assert len(result.examples) == 1 and result.examples[0].fields["premise"] == "It rained, a lot."
    assert "row 2" in result.skipped[0].reason and "empty 'hypothesis'" in result.skipped[0].reason
    with pytest.raises(SinkscopeError, match="no file for sst2"):
        load_examples("sst2", tmp_path)
    with pytest.raises(SinkscopeError, match="does not exist"):
        load_examples("sst2", tmp_path / "missing.jsonl")


def test_hub_needs_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(SinkscopeError, match="pip install datasets"):
        load_examples("sst2", "hub")


def test_sample_is_seeded_nested_and_in_source_order(tmp_path):
    path = _write_jsonl(tmp_path / "mr.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(40)])
    examples = load_examples("mr", path).examples
    small, large = sample(examples, 10, seed=0), sample(examples, 20, seed=0)
    assert len(small) == 10 and set(x.id for x in small) <= set(x.id for x in large)
    assert [x.row for x in small] == sorted(x.row for x in small)
    assert small == sample(examples, 10, seed=0) and small != sample(examples, 10, seed=1)
    assert sample(examples, 100) == examples and sample(examples, None) == examples
    with pytest.raises(SinkscopeError, match="--limit"):
        sample(examples, 0)


@needs_data
@pytest.mark.parametrize("name", list(SPECS))
def test_shared_copies_load_cleanly(name):
    result = load_examples(name, DATA)
    assert not result.skipped, result.skipped[:3]
    assert len(result.examples) in (56, 500, 872, 1000)
    readme = (DATA / name / "README.md").read_text()
    # the README's label distribution, e.g. {'negative': 428, 'positive': 444}, matches what was loaded
    counts: dict[str, int] = {}
    for x in result.examples:
        label = get_spec(name).labels[x.label_id]
        counts[label] = counts.get(label, 0) + 1
    line = next(ln for ln in readme.splitlines() if ln.startswith("- Label distribution"))
    for label, count in counts.items():
        assert f"'{label}': {count}" in line


def test_falling_back_to_the_hub_says_where_it_looked(monkeypatch):
    import builtins
    import sys

    import sinkscope.analyses.evaluate.datasets as ds

    monkeypatch.setattr(ds, "default_data_dir", lambda: None)
    monkeypatch.delenv("SINKSCOPE_DATA", raising=False)
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets here")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(SinkscopeError, match=r"SINKSCOPE_DATA.*looked for local copies in --data \(not given\)"):
        ds.load_examples("sst2")
