"""Probes on tag / non-tag / full head outputs: planted-label synthetic check, data loading, CLI (seed 003 §4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn is not installed")

from conftest import SHARED
from sinkscope.analyses.probes import SST2_TEMPLATE, best_heads, fit_probes, load_statements, make_probe
from sinkscope.errors import SinkscopeError

DATA = SHARED / "data"
needs_data = pytest.mark.skipif(not (DATA / "geometry_of_truth" / "test.jsonl").exists(),
                                reason=f"shared data not found at {DATA}")


def _planted(n: int = 400, layers: int = 2, heads: int = 3, d: int = 16, seed: int = 0):
    """Label planted in the tag of (layer 1, head 2) only: tag = (2y − 1)·u + noise; non-tag is pure noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    tag = rng.normal(size=(n, layers, heads, d)) * 0.5
    u = rng.normal(size=d)
    tag[:, 1, 2] += (2 * y[:, None] - 1) * u[None, :]
    nontag = rng.normal(size=(n, layers, heads, d)) * 3.0
    return {"tag": tag, "nontag": nontag, "full": tag + nontag}, y


def test_planted_tag_label_gives_high_tag_and_chance_nontag_accuracy():
    features, y = _planted()
    table = fit_probes(features, y, test_size=0.25, random_state=0)
    assert set(table.columns) >= {"layer", "head", "part", "train_accuracy", "test_accuracy", "n_test"}
    acc = table.set_index(["layer", "head", "part"])["test_accuracy"]
    assert acc[(1, 2, "tag")] > 0.95
    assert abs(acc[(1, 2, "nontag")] - 0.5) < 0.12
    others = table[(table["part"] == "tag") & ~((table["layer"] == 1) & (table["head"] == 2))]
    assert others["test_accuracy"].max() < 0.7
    best = best_heads(table, top=3)
    assert (int(best.iloc[0]["layer"]), int(best.iloc[0]["head"])) == (1, 2)
    assert best.iloc[0]["gap"] > 0.35


def test_probe_split_is_fixed_and_constant_features_score_chance():
    features, y = _planted(n=120)
    features["tag"][:, 0, 0] = 0.0  # a head without sinks: the tag is identically zero
    a = fit_probes(features, y, random_state=3)
    b = fit_probes(features, y, random_state=3)
    assert a.equals(b)
    row = a[(a["layer"] == 0) & (a["head"] == 0) & (a["part"] == "tag")].iloc[0]
    assert row["test_accuracy"] == row["chance"]
    probe = make_probe(random_state=0).fit(features["tag"][:, 1, 2], y)
    assert probe.score(features["tag"][:, 1, 2], y) > 0.9


def test_fit_probes_rejects_bad_shapes():
    features, y = _planted(n=50)
    with pytest.raises(SinkscopeError):
        fit_probes(features, y[:-1])


@needs_data
@pytest.mark.parametrize("name", ["geometry_of_truth", "azaria_mitchell_true_false", "sst2"])
def test_load_statements_balanced(name):
    texts, y = load_statements(name, 40, seed=1, data_dir=DATA)
    assert len(texts) == 40 and int(y.sum()) == 20
    assert load_statements(name, 40, seed=1, data_dir=DATA)[0] == texts
    if name == "sst2":
        assert texts[0].startswith(SST2_TEMPLATE.split("{")[0]) and texts[0].endswith(". This statement is:")


def test_load_statements_from_jsonl_and_errors(tmp_path: Path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a", "label": true}\n{"text": "b", "label": 0}\n{"text": "c", "label": "False"}\n')
    texts, y = load_statements(str(path), None)
    assert texts == ["a", "b", "c"] and y.tolist() == [1, 0, 0]
    with pytest.raises(SinkscopeError, match="unknown data set"):
        load_statements("nope", 10)


def test_probe_cli_on_tiny_model(tmp_path: Path):
    import typer
    from typer.testing import CliRunner

    from sinkscope.cli.tags import probe_command
    from sinkscope.store import load_run

    rows = [f'{{"text": "Statement number {i} is {"true" if i % 2 else "false"}.", "label": {i % 2}}}'
            for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n")
    app = typer.Typer()
    app.command("probe")(probe_command)
    app.command("other")(lambda: None)
    res = CliRunner().invoke(app, ["probe", "--model", "tiny:llama", "--dataset", str(data), "--n", "40", "--out",
                                   str(tmp_path / "run"), "--eps", "0.1"])
    assert res.exit_code == 0, res.output
    run = load_run(tmp_path / "run")
    assert len(run["probes"]) == 2 * 4 * 3 and len(run["best_heads"]) <= 10
