"""ACT head search, calibration files and the mitigation benchmark on a tiny model and a hand-made dataset."""

from __future__ import annotations

import json

import pytest
import torch

from sinkscope.analyses.calibrate import Calibration, accuracy, mitigation_benchmark, predict, search_heads
from sinkscope.analyses.evaluate.datasets import get_spec, load_examples
from sinkscope.errors import SinkscopeError
from sinkscope.models import tiny_model

ROWS = [("a lovely, warm film", "positive"), ("dull and far too long", "negative"), ("great fun", "positive"),
        ("a mess", "negative"), ("moving and funny", "positive"), ("boring", "negative")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sst2.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": t, "label": y}) + "\n" for i, (t, y) in enumerate(ROWS)))
    spec = get_spec("sst2")
    return tiny_model("llama"), spec, load_examples(spec, path).examples


def test_identity_calibration_keeps_predictions(setup):
    lm, spec, examples = setup
    plain = predict(lm, spec, examples)
    identity = Calibration(heads={0: [0, 1], 1: [2]}, beta=1.0)
    assert torch.equal(predict(lm, spec, examples, identity.interventions()), plain)


def test_search_and_roundtrip(setup, tmp_path):
    lm, spec, examples = setup
    seen: list[dict] = []
    calibration = search_heads(lm, spec, examples, beta=0.0, top_layers=2, on_trial=seen.append)
    assert seen == calibration.search and all(r["seconds"] > 0 for r in seen)
    layer_rows = [r for r in calibration.search if r["stage"] == "layer"]
    assert [r["layer"] for r in layer_rows] == [0, 1]
    assert calibration.base_accuracy == pytest.approx(accuracy(lm, spec, examples))
    for layer, heads in calibration.heads.items():  # every kept head helped on its own
        for head in heads:
            row = next(r for r in calibration.search if r["stage"] == "head" and r["layer"] == layer
                       and r["head"] == head)
            assert row["accuracy"] > calibration.base_accuracy
    loaded = Calibration.load(calibration.save(tmp_path / "calib.json"))
    assert loaded.heads == calibration.heads and loaded.beta == 0.0
    with pytest.raises(SinkscopeError, match="does not exist"):
        Calibration.load(tmp_path / "missing.json")


def test_mitigation_benchmark_table(setup):
    lm, spec, examples = setup
    table = mitigation_benchmark(lm, spec, examples, Calibration(heads={1: [0]}))
    assert table["method"].tolist() == ["none", "mask_pos0", "reweight_zscore_0.4", "act_all", "act_searched",
                                        "dmr_zscore", "dmr_entropy_delta"]
    assert table["accuracy"].between(0, 1).all() and table.loc[0, "changed_predictions"] == 0.0
    assert (table["ms_per_example"] > 0).all()
