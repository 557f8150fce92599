"""The report sections of each command's run folder (`report.views`): each appears for its own command's run only,
carries its parts (charts' data, grids, token views, inline figures), and bounds what it embeds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from sinkscope.errors import SinkscopeError
from sinkscope.report import build_html, write_report
from sinkscope.report.source import FolderTables, run_tables
from sinkscope.store import Run, load_run

SECTIONS = {"eval": "eval", "stream": "stream", "tags": "tags", "tags-sensitivity": "tags",
            "mechanisms": "mechanisms", "calibrate": "calibrate", "bench-mitigation": "bench-mitigation"}


def page(folder: Path) -> tuple[str, dict[str, Any]]:
    """The report of a run folder: its HTML and the page's data."""
    text = write_report(folder).read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="ss-data">(.*?)</script>', text, re.S)
    assert found is not None
    return text, json.loads(found.group(1))


@pytest.fixture(scope="module")
def pages(command_runs) -> dict[str, tuple[str, dict[str, Any]]]:
    return {name: page(folder) for name, folder in command_runs.items()}


@pytest.mark.parametrize("command", list(SECTIONS))
def test_each_command_gets_its_own_section_only(pages, command):
    text, data = pages[command]
    mine = SECTIONS[command]
    assert f'id="sec-{mine}"' in text and mine in data["sections"]
    others = set(SECTIONS.values()) - {mine}
    assert not any(f'id="sec-{other}"' in text for other in others)
    assert f'<a href="#sec-{mine}">' in text  # in the page's navigation
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_eval_section(pages, command_runs):
    text, data = pages["eval"]
    sec = data["sections"]["eval"]
    run = load_run(command_runs["eval"])
    assert list(sec["datasets"]) == ["sst2"] and sec["methods"] == ["zscore", "mean_multiple"]
    sst2 = sec["datasets"]["sst2"]
    assert [s["name"] for s in sst2["bars"]["series"]] == ["before", "zscore", "mean_multiple"]
    assert len(sst2["table"]["rows"]) == 3 and sst2["n"] == 3
    # the causal-alignment scatter: one point per example with causal effects, ρ before and after each method
    causal = run["alignment"].dropna(subset=["spearman"])
    assert len(sec["points"]["keys"]) == causal["example_id"].nunique() == 2
    before = causal[causal["variant"] == "before"].set_index("example_id")["spearman"]
    for key, rho in zip(sec["points"]["keys"], sec["points"]["before"], strict=True):
        assert rho == pytest.approx(before[key.split("/", 1)[1]], abs=1e-5)
    # the drill-down: every example's token view, with the causal ones first
    assert len(sec["views"]) == 3 and len(sec["examples"]["rows"]) == 3
    tokens = run["tokens"]
    for key, view in sec["views"].items():
        rows = tokens[tokens["example_id"] == key.split("/", 1)[1]].sort_values("position")
        assert view["tokens"] == rows["token"].tolist()
        np.testing.assert_allclose(view["before"], rows["attention_before"], atol=1e-6)
        assert view["after"]["zscore"]["sinks"] == rows["sink_zscore"].tolist()
    assert sum(v["causal"] is not None for v in sec["views"].values()) == 2
    assert 'class="ss-eval-examples"' in text and 'ss-eval-detail" hidden' in text


def test_eval_token_views_are_bounded(command_runs, monkeypatch):
    from sinkscope.report.views import eval as view

    monkeypatch.setattr(view, "MAX_TOKEN_EXAMPLES", 1)
    _, data = page(command_runs["eval"])
    views = data["sections"]["eval"]["views"]
    assert len(views) == 1 and next(iter(views.values()))["causal"] is not None  # a causal example first


def test_stream_section(pages, command_runs):
    _, data = pages["stream"]
    sec = data["sections"]["stream"]
    tokens = load_run(command_runs["stream"])["tokens"]
    assert [s["policy"] for s in sec["series"]] == ["full", "sink_window", "window"]
    assert sec["x"] == tokens["position"].tolist() and not sec["binned"]
    np.testing.assert_allclose(sec["series"][1]["y"], tokens["nll_sink_window"], atol=1e-5)
    assert sec["evict"] == 2 + 8 + 1  # the first token predicted from a cache that has evicted
    assert [s["name"] for s in sec["ppl"]["series"]] == ["perplexity, all tokens", "after eviction starts"]


def test_stream_bins_a_long_text():
    from sinkscope.report.views.stream import binned

    values = pd.DataFrame({"nll_full": np.arange(10, dtype=float)})
    x, y = binned(np.arange(1, 11), values, max_points=4)
    assert len(x) == len(y) == 4 and x[0] == 1
    assert y["nll_full"].iloc[0] == pytest.approx(np.arange(10)[:3].mean())


def test_tags_section(pages, command_runs):
    text, data = pages["tags"]
    sec = data["sections"]["tags"]
    run = load_run(command_runs["tags"])
    heads = sec["heads"]
    assert (heads["L"], heads["H"]) == (2, 4)
    var = next(m for m in heads["metrics"] if m["name"] == "var_explained")["values"]
    summary = run["head_summary"]
    np.testing.assert_allclose(var, summary.sort_values(["layer", "head"])["var_explained"], atol=1e-5)
    sinks = run["sinks"]
    some = sinks.iloc[0]
    listed = heads["sinks"][f"{some['layer']},{some['head']}"]
    assert [int(some["prompt_id"]), int(some["position"]), some["token"]] in [r[:3] for r in listed]
    pca = sec["pca"]
    assert pca["tokens"] == run["pca"].sort_values("position")["token"].tolist() and pca["layer"] == 1
    assert sum(len(s["x"]) for s in pca["series"]) == len(pca["tokens"])
    assert sec["taxonomy"]["categories"] and sec["cosines"]["series"]
    for figure in ("pca.png", "tag_cosines.png"):  # the command's figures, inline
        assert re.search(rf'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="[^"]*" data-file="{figure}"', text)
    _, sens = pages["tags-sensitivity"]
    curves = sens["sections"]["tags"]["sensitivity"]["charts"]
    assert [len(c["series"][0]["x"]) for c in curves] == [3, 3, 3]
    assert sens["sections"]["tags"]["heads"] is None


def test_mechanisms_section(pages, command_runs):
    text, data = pages["mechanisms"]
    sec = data["sections"]["mechanisms"]
    run = load_run(command_runs["mechanisms"])
    norms = run["norms"]
    maps = sec["norms"]["prompts"]
    assert [p["prompt_id"] for p in maps] == [0, 1]
    first = maps[0]
    sites = norms[norms["prompt_id"] == 0]["depth"].nunique()
    assert len(first["sites"]) == sites and first["sites"][0] == "embed" and len(first["values"]) == sites * first["n"]
    row = norms[(norms["prompt_id"] == 0) & (norms["depth"] == norms["depth"].max()) & (norms["position"] == 3)]
    assert 10 ** first["values"][(sites - 1) * first["n"] + 3] == pytest.approx(float(row["norm"].iloc[0]), rel=1e-3)
    assert [s["name"] for s in sec["bos"]["alpha0"]] == ["with_bos", "no_bos", "replaced"]
    assert sec["ablation"]["categories"] == run["ablation"]["ablation"].tolist()[:3] == ["L0H0", "L0H1", "L0 all"]
    assert len(sec["massive"]["categories"]) == min(20, len(run["massive"]))
    assert {s["name"] for s in sec["profile"]["norm"]} == {"‖h₀‖ (position 0)", "median ‖h_j‖, j ≥ 1"}
    for figure in run.manifest["parameters"]["figures"]:
        assert f'data-file="{figure}"' in text


def test_calibrate_and_mitigation_sections(pages, command_runs):
    _, data = pages["calibrate"]
    sec = data["sections"]["calibrate"]
    search = load_run(command_runs["calibrate"])["search"]
    assert len(sec["trials"]["categories"]) == len(search) and sec["trials"]["categories"][0] == "layer L0"
    assert sec["base"] is not None and [s["name"] for s in sec["summary"]["series"]] == ["before", "after calibration"]
    _, data = pages["bench-mitigation"]
    sec = data["sections"]["bench-mitigation"]
    table = load_run(command_runs["bench-mitigation"])["mitigation"]
    assert len(sec["table"]["rows"]) == len(table) and "accuracy" in sec["bars"]
    assert sec["charts"][0]["categories"] == table["method"].tolist()


def test_sections_keep_out_of_other_runs():
    """A run of another command (an explain run, a bare table, nothing) gets none of these sections."""
    accuracy = pd.DataFrame({"task": ["a"], "accuracy": [0.5]})
    tokens = pd.DataFrame({"prompt_id": 0, "position": range(3), "token": list("abc"), "before": 0.3, "after": 0.3})
    for run in (Run(tables={"accuracy": accuracy}), Run(tables={"tokens": tokens}), Run(tables={})):
        text = build_html(run)
        assert not any(f'id="sec-{name}"' in text for name in set(SECTIONS.values()))


def test_figures_are_checked_against_the_manifest(command_runs, tmp_path):
    import shutil

    folder = shutil.copytree(command_runs["mechanisms"], tmp_path / "mech")
    tables = FolderTables(folder)
    assert tables.file("pos0_norm.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert tables.file("no_such.png") is None and tables.file("norms.parquet") is None
    assert run_tables(tables.run()) is tables  # a section reads the folder it was given a piece at a time
    (folder / "pos0_norm.png").write_bytes(b"not a png")
    with pytest.raises(SinkscopeError, match=r"pos0_norm\.png"):
        write_report(folder)
