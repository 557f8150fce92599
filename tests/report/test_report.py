"""The HTML report: data built from run-folder tables, self-containment, the section API, size limits."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sinkscope.analyses.maps import add_maps, capture_maps, maps_table
from sinkscope.errors import SinkscopeError
from sinkscope.report import (
    ReportLimits,
    SectionContent,
    build_html,
    register_section,
    registered_sections,
    table_html,
    unregister_section,
    write_report,
)
from sinkscope.report.encode import pack, script_json, unpack
from sinkscope.store import Run, load_run, save_run

PROMPTS = ["The cat sat on the mat.", "Hi </script> there!",
           "A longer prompt, well past the sixty-four token limit for maps: one two three four five six seven."]


def page_data(page: str) -> dict:
    """The JSON the page embeds in <script id="ss-data">."""
    match = re.search(r'<script type="application/json" id="ss-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory) -> Path:
    """A profile run folder of the tiny Llama (2 layers × 4 heads) with maps for its two short prompts."""
    from sinkscope.analyses.profile import profile

    result = profile(tiny_llama, PROMPTS)
    run = add_maps(result.run(tiny_llama), capture_maps(tiny_llama, PROMPTS))
    return save_run(tmp_path_factory.mktemp("report") / "tiny", run)


def test_pack_round_trip():
    x = np.random.default_rng(0).dirichlet(np.ones(50), size=(3, 4)).astype(np.float32)
    exact = pack(x)
    assert exact["enc"] == "f32" and exact["shape"] == [3, 4, 50]
    np.testing.assert_array_equal(unpack(exact), x.astype(np.float64))
    half = pack(x, exact=False)
    assert half["enc"] == "f16"
    np.testing.assert_allclose(unpack(half), x, rtol=1e-3, atol=1e-7)


def test_script_json_cannot_close_the_script():
    text = script_json({"token": "</script><b>&", "nan": float("nan"), "arr": np.arange(3)})
    assert "</" not in text and "<b>" not in text
    assert json.loads(text) == {"token": "</script><b>&", "nan": None, "arr": [0, 1, 2]}


def test_report_of_a_run_folder(tiny_run):
    path = write_report(tiny_run)
    assert path == tiny_run / "report.html"
    page = path.read_text()
    # self-contained: nothing loaded from elsewhere, and the page forbids it
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert "</script> there" not in page  # the token text is escaped inside the JSON
    data = page_data(page)
    grid = data["grid"]
    assert (grid["L"], grid["H"]) == (2, 4)
    assert [v["label"] for v in grid["views"]] == ["mean over prompts", "prompt 0", "prompt 1", "prompt 2"]
    for view in grid["views"]:
        assert all(len(values) == 8 for values in view["values"].values())
        assert len(view["sinks"]) == 8
    tokens = data["tokens"]
    assert tokens["mode"] == "interactive" and tokens["stat"] == "last_row"
    assert [p["layout"] for p in tokens["prompts"]] == ["head"] * 3
    # the embedded per-head rows are the keys table's last_row values, exactly
    keys = load_run(tiny_run)["keys"]
    first = tokens["prompts"][0]
    rows = unpack(first["rows"])
    sub = keys[keys["prompt_id"] == 0]
    np.testing.assert_array_equal(rows[sub["layer"], sub["head"], sub["position"]], sub["last_row"].to_numpy())
    assert len(first["tokens"]) == rows.shape[2] == int(sub["position"].max()) + 1
    # maps for the two short prompts only, every head
    maps = data["maps"]["prompts"]
    assert set(maps) == {"0", "1"} and len(maps["0"]["heads"]) == 8
    m = unpack(maps["0"]["heads"]["1,2"])
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
    assert [c["id"] for c in data["curves"]["charts"]] == ["sinks"]
    assert {t["name"] for t in data["tables"]} == {"keys", "heads", "layers", "prompts"}  # no skipped prompts: no table


def test_maps_table_matches_the_trace(tiny_llama):
    from sinkscope.capture import CaptureConfig, run_capture

    trace = run_capture(tiny_llama, PROMPTS[:2], CaptureConfig(rows=None, entropy=False, maps=True))
    table = maps_table(trace, prompt_ids=[5, 7])
    n0, n1 = (int(n) for n in trace.lengths)
    assert len(table) == 2 * 4 * (n0 * n0 + n1 * n1)
    sub = table[(table["prompt_id"] == 7) & (table["layer"] == 1) & (table["head"] == 3)]
    dense = np.zeros((n1, n1))
    dense[sub["query"], sub["key"]] = sub["weight"]
    np.testing.assert_allclose(dense, trace.maps[1, 1, 3, :n1, :n1].numpy(), atol=1e-7)
    assert maps_table(trace, max_tokens=n1).prompt_id.unique().tolist() == [1]
    with pytest.raises(SinkscopeError, match="maps=True"):
        maps_table(run_capture(tiny_llama, PROMPTS[:1]))


def test_write_report_paths(tiny_run, tmp_path):
    run = load_run(tiny_run)
    with pytest.raises(SinkscopeError, match="out="):
        write_report(run)
    assert write_report(run, tmp_path / "x") == tmp_path / "x" / "report.html"
    assert write_report(run, tmp_path / "named.html").exists()


def test_registered_and_extra_sections(tiny_run):
    seen = []

    def eval_section(run: Run) -> SectionContent:
        seen.append(run)
        frame = pd.DataFrame({"task": ["a", "b"], "accuracy": [0.5, 0.75]})
        return SectionContent(html="<p>accuracy</p>" + table_html(frame, "acc", caption="accuracy"),
                              data={"n": 2}, script="el.dataset.ran = data.n;")

    register_section("evaltest", eval_section, title="Evaluation", order=5)
    register_section("skipme", lambda run: None)
    try:
        with pytest.raises(SinkscopeError, match="already registered"):
            register_section("evaltest", lambda run: "<p>other</p>")
        with pytest.raises(SinkscopeError, match="section name"):
            register_section("bad name", lambda run: "")
        with pytest.raises(SinkscopeError, match="taken by the report"):
            register_section("grid", lambda run: "")
        assert [s.name for s in registered_sections()][:1] == ["evaltest"]
        page = build_html(load_run(tiny_run), extra={"Notes": "<p>hand-written</p>", "Later": lambda run: None})
    finally:
        unregister_section("evaltest")
        unregister_section("skipme")
    assert len(seen) == 1
    assert '<section id="sec-evaltest" data-section="evaltest"><h2>Evaluation</h2><p>accuracy</p>' in page
    assert 'id="sec-skipme"' not in page and "Later" not in page
    assert "<h2>Notes</h2><p>hand-written</p>" in page
    assert page_data(page)["sections"] == {"evaltest": {"n": 2}}
    assert '.push(["evaltest", function (el, data, ss)' in page
    assert page.index("sec-evaltest") < page.index("sec-tables")

    @register_section("badtype")
    def bad(run):
        return 42

    try:
        with pytest.raises(SinkscopeError, match="must return"):
            build_html(load_run(tiny_run))
    finally:
        unregister_section("badtype")


def test_static_token_view_and_norms():
    tokens = pd.DataFrame({"prompt_id": 0, "position": range(4), "token": ["<s>", "a", "b", "c"],
                           "before": [0.7, 0.1, 0.1, 0.1], "after": [0.0, 1 / 3, 1 / 3, 1 / 3],
                           "sink": [True, False, False, False]})
    norms = pd.DataFrame({"layer": [0, 0, 1, 1], "position": [0, 1, 0, 1], "norm": [1.0, 1.0, 9.0, 1.2]})
    data = page_data(build_html(Run(tables={"tokens": tokens, "norms": norms},
                                    manifest={"command": "explain", "parameters": {"method": "zscore"}})))
    assert data["grid"] is None
    assert data["tokens"]["mode"] == "static" and data["tokens"]["prompts"][0]["sinks"] == [True, False, False, False]
    chart = data["curves"]["charts"][0]
    assert chart["id"] == "norms" and chart["series"][0]["y"] == [1.0, 9.0]


@pytest.mark.slow
def test_large_model_stays_small_and_fast():
    """32 layers × 32 heads, a 2,000-token prompt: per-head rows in float16, a page of a few MB, built quickly."""
    from sinkscope.report.synthetic import synthetic_run

    run = synthetic_run(32, 32, 2000)
    start = time.perf_counter()
    page = build_html(run)
    elapsed = time.perf_counter() - start
    assert len(page.encode()) < 8_000_000
    assert elapsed < 15
    data = page_data(page)
    view = data["tokens"]["prompts"][0]
    assert view["layout"] == "head" and view["rows"]["enc"] == "f16" and view["rows"]["shape"] == [32, 32, 2000]
    assert len(data["grid"]["views"][0]["values"]["sink_mass"]) == 1024
    assert next(t for t in data["tables"] if t["name"] == "keys")["note"].startswith("top 500 of 2,048,000")
    # a tighter budget falls back to per-layer means, then leaves the prompt out
    small = page_data(build_html(run, limits=ReportLimits(max_token_values=100_000)))
    assert small["tokens"]["prompts"][0]["layout"] == "layer"
    none = page_data(build_html(run, limits=ReportLimits(max_token_values=10)))
    assert none["tokens"]["mode"] == "none" and none["tokens"]["notes"]


def test_section_modules_missing_ones_are_skipped(monkeypatch, tiny_run):
    from sinkscope.report import sections

    monkeypatch.setattr(sections, "SECTION_MODULES", ["sinkscope.no_such_analysis"])
    assert "Layer × head grid" in build_html(load_run(tiny_run))
    monkeypatch.setattr(sections, "SECTION_MODULES", ["sinkscope.report.no_such_module.inner"])
    build_html(load_run(tiny_run))


def test_many_prompts_cap_the_embedded_views():
    from sinkscope.report.synthetic import synthetic_run

    run = synthetic_run(2, 3, 40, n_prompts=20, norms=False)
    data = page_data(build_html(run, limits=ReportLimits(max_grid_prompts=4, max_view_prompts=3)))
    assert [v["label"] for v in data["grid"]["views"]] == ["mean over prompts"] + [f"prompt {i}" for i in range(4)]
    assert [p["prompt_id"] for p in data["tokens"]["prompts"]] == [0, 1, 2]
    assert data["grid"]["views"][0]["sinks"][0].startswith("'The'@0 in 20/20")  # layer 0, head 0, over all prompts


def test_report_command(tiny_run, tmp_path):
    import typer
    from typer.testing import CliRunner

    from sinkscope.cli.report import report_command

    app = typer.Typer()
    app.command("report")(report_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["report", str(tiny_run), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "r.html").exists()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])  # one line and status 2, as every command
    assert bad.exit_code == 2 and "not a folder" in bad.output
    bad = CliRunner().invoke(app, ["report", str(tiny_run), "--figures", "--format", "jpg"])
    assert bad.exit_code == 2 and "png" in bad.output


def test_curves_of_a_mechanisms_run():
    """The mechanisms analysis' shapes: layers (layer, alpha0, sink_share, …), norms by site depth."""
    layers = pd.DataFrame({"layer": [0, 1], "alpha0": [0.1, 0.8], "sink_share": [0.0, 1.0], "top_other_alpha": 0.05})
    sites = [(-1, "embed", 0.0), (0, "attn", 0.5), (0, "block", 1.0), (1, "attn", 1.5), (1, "block", 2.0)]
    rows = [{"prompt_id": 0, "layer": layer, "sublayer": sub, "depth": depth, "position": pos,
             "norm": (10.0 * depth if pos == 0 else 1.0 + pos)} for layer, sub, depth in sites for pos in range(4)]
    data = page_data(build_html(Run(tables={"layers": layers, "norms": pd.DataFrame(rows)}, manifest={})))
    sinks, norms = data["curves"]["charts"]
    assert [s["name"] for s in sinks["series"]] == ["share of heads with α₀ > ε", "α at position 0",
                                                     "largest α at another position"]
    assert norms["xlabel"] == "depth" and norms["series"][0]["x"] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert norms["series"][1]["y"] == [3.0] * 5  # the median of 2, 3, 4


def streamed_folder(path: Path, run: Run, keys: pd.DataFrame | None = None) -> Path:
    """Save `run` as `profile --out` does: `keys` (default: the run's) appended a prompt at a time (row groups of
    whole prompts), the other tables whole."""
    from sinkscope.store import open_run

    keys = run["keys"] if keys is None else keys
    with open_run(path, run.manifest["command"]) as folder, folder.table_stream(row_group_rows=1000) as stream:
        for _, part in keys.groupby("prompt_id", sort=False):
            stream.append("keys", part)
        rest = {name: table for name, table in run.tables.items() if name != "keys"}
        folder.save(Run(rest, run.manifest), streams=stream, order=list(run.tables))
    return path


def test_many_prompts_state_the_limit_and_the_grid_covers_them_all(tmp_path, monkeypatch):
    """More prompts than the embed limits: the page says which prompts its per-prompt views hold, the mean grid is
    the mean over every prompt (checked against pandas on the full keys table), and the keys table is only read in
    batches (cut across prompts here) or a prompt at a time."""
    from sinkscope.report import source
    from sinkscope.report.synthetic import synthetic_run

    run = synthetic_run(3, 4, 30, n_prompts=40, norms=False, seed=3)
    folder = streamed_folder(tmp_path / "run", run)
    monkeypatch.setattr(source, "BATCH_ROWS", 333)  # not a multiple of any prompt's rows
    whole_reads = []
    read_table = source.read_table

    def tracked(folder, name, columns=None, *, prompt_ids=None):
        if prompt_ids is None:
            whole_reads.append(name)
        return read_table(folder, name, columns, prompt_ids=prompt_ids)

    monkeypatch.setattr(source, "read_table", tracked)
    limits = ReportLimits(max_grid_prompts=5, max_view_prompts=3, max_table_rows=50)
    page = write_report(folder, limits=limits, extra={"Count": lambda r: f"<p>{len(r['prompts'])} prompts</p>"}
                        ).read_text()
    assert "keys" not in whole_reads
    assert "grids of single prompts are embedded for the first 5 of 40 prompts" in page
    assert "The token view holds the first 3 of 40 prompts" in page
    assert "<p>40 prompts</p>" in page  # a contributed section reads the folder's tables by name
    data = page_data(page)
    grid = data["grid"]
    assert grid["n_prompts"] == 40
    assert [v["label"] for v in grid["views"]] == ["mean over prompts"] + [f"prompt {i}" for i in range(5)]
    assert [p["prompt_id"] for p in data["tokens"]["prompts"]] == [0, 1, 2]

    keys = pd.read_parquet(folder / "keys.parquet")
    sunk = keys.assign(sink_mass=keys["alpha"].where(keys["sink"], 0.0),
                       last_row_sink_mass=keys["last_row"].where(keys["sink"], 0.0))
    per = sunk.groupby(["prompt_id", "layer", "head"]).agg(
        sink_mass=("sink_mass", "sum"), top_alpha=("alpha", "max"), last_row_sink_mass=("last_row_sink_mass", "sum"))
    per["pos0_alpha"] = keys[keys["position"] == 0].set_index(["prompt_id", "layer", "head"])["alpha"]
    mean = per.groupby(["layer", "head"]).mean()  # rows in layer-major order, as the page's flat lists
    for name in ("sink_mass", "top_alpha", "pos0_alpha", "last_row_sink_mass"):
        np.testing.assert_allclose(grid["views"][0]["values"][name], mean[name].to_numpy(), rtol=0, atol=5.1e-6)
        for view in grid["views"][1:]:
            np.testing.assert_allclose(view["values"][name], per.loc[view["prompt_id"], name].to_numpy(), rtol=0,
                                       atol=5.1e-6)
    first = keys[keys["sink"] & (keys["position"] == 0)].groupby(["layer", "head"])["alpha"].agg(["size", "mean"])
    for (layer, head), (size, alpha) in first.iterrows():  # every prompt starts with 'The', the most frequent sink
        assert grid["views"][0]["sinks"][layer * 4 + head].startswith(f"'The'@0 in {int(size)}/40, α {alpha:.3f}")
    top = next(t for t in data["tables"] if t["name"] == "keys")
    assert top["note"] == f"top 50 of {len(keys):,} rows by alpha"
    np.testing.assert_array_equal([row[top["columns"].index("alpha")] for row in top["rows"]],
                                  keys["alpha"].nlargest(50).to_numpy())
    # the same page as from the run in memory
    assert page_data(build_html(run, limits=limits)) == data


def test_a_folder_not_sorted_by_prompt_and_chosen_prompts(tmp_path, monkeypatch):
    """A keys table whose prompt ids decrease is reduced whole (same page as in memory); `prompts=` picks the
    prompts with per-prompt views and the page names them."""
    from sinkscope.report import source
    from sinkscope.report.synthetic import synthetic_run

    run = synthetic_run(2, 3, 20, n_prompts=12, norms=False, seed=4)
    backwards = run["keys"].sort_values("prompt_id", ascending=False, kind="stable", ignore_index=True)
    folder = streamed_folder(tmp_path / "run", run, backwards)
    monkeypatch.setattr(source, "BATCH_ROWS", 100)
    limits = ReportLimits(max_grid_prompts=4, max_view_prompts=2)
    page = write_report(folder, limits=limits).read_text()
    memory = Run({**run.tables, "keys": backwards}, run.manifest)
    assert page_data(page) == page_data(build_html(memory, limits=limits))
    chosen = page_data(write_report(folder, tmp_path / "chosen.html", prompts=[9, 3, 99]).read_text())
    assert [v["label"] for v in chosen["grid"]["views"]] == ["mean over prompts", "prompt 3", "prompt 9"]
    assert [p["prompt_id"] for p in chosen["tokens"]["prompts"]] == [3, 9]
    assert chosen["tokens"]["limited"].startswith("The token view holds prompts 3, 9 of 12 prompts")


def test_report_cli_picks_prompts_for_the_per_prompt_views(tmp_path):
    """`sinkscope report RUN --prompt-ids 3,9` is `write_report(RUN, prompts=[3, 9])`, and the page's limit sentence
    names the option."""
    from typer.testing import CliRunner

    from sinkscope.cli.app import app
    from sinkscope.report.synthetic import synthetic_run

    run = synthetic_run(2, 3, 20, n_prompts=40, norms=False, seed=4)
    folder = streamed_folder(tmp_path / "run", run, run["keys"])
    res = CliRunner().invoke(app, ["report", str(folder), "--prompt-ids", "3,9"])
    assert res.exit_code == 0, res.output
    chosen = page_data((folder / "report.html").read_text())
    assert [p["prompt_id"] for p in chosen["tokens"]["prompts"]] == [3, 9]
    res = CliRunner().invoke(app, ["report", str(folder)])
    assert "--prompt-ids" in page_data((folder / "report.html").read_text())["tokens"]["limited"]


def test_overview_parameters_read_as_text_not_a_python_repr():
    from sinkscope.report.page import _readable

    params = {"method": "column_mass", "min_queries": 16, "eps": 0.2000, "layers": [0, 1],
              "capture": {"rows": "last", "maps": False, "chunk_size": None, "fused": True},
              "method_params": {"zscore": {"alpha": 2.0}}}
    text = _readable(params)
    assert text == ("method=column_mass, min_queries=16, eps=0.2, layers=[0, 1], capture (rows=last, fused=True), "
                    "method_params (zscore (alpha=2))")
    assert "{" not in text and "'" not in text
