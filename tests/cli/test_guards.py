"""Resource guards of the shared options: checked before any work is done."""

from __future__ import annotations

import pytest

from sinkscope.cli.options import parse_selection
from sinkscope.errors import SinkscopeError


def test_huge_selection_is_refused_before_it_is_expanded():
    with pytest.raises(SinkscopeError, match="more than 100,000"):
        parse_selection("0-99999999")
    assert parse_selection("3-6") == [3, 4, 5, 6] and parse_selection("all") is None


def test_json_lines_are_found_by_content_and_a_file_of_bad_lines_is_one_message(tmp_path):
    from sinkscope.cli.options import read_prompts

    saved_as_json = tmp_path / "prompts.json"
    saved_as_json.write_text('{"text": "first prompt"}\n{"prompt": "second"}\n')
    as_txt = tmp_path / "prompts.txt"
    as_txt.write_text('{"text": "first prompt"}\n')
    plain = tmp_path / "plain.txt"
    plain.write_text("a {braced} prompt\nanother\n")
    assert read_prompts(saved_as_json) == (["first prompt", "second"], [])
    assert read_prompts(as_txt)[0] == ["first prompt"]
    assert read_prompts(plain)[0] == ["a {braced} prompt", "another"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"title": "no text"}\n[1, 2]\n')
    with pytest.raises(SinkscopeError, match=r"no line of .*broken\.jsonl is a JSON object with a \"text\""):
        read_prompts(broken)
    with pytest.raises(SinkscopeError, match="is a folder"):
        read_prompts(tmp_path)


def test_unusable_out_is_refused_before_the_model_is_loaded(tmp_path):
    from typer.testing import CliRunner

    from sinkscope.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["profile", "--model", "no-such-model-anywhere", "--prompt", "hi",
                                      "--out", str(blocker / "run")])
    assert result.exit_code == 2
    assert "not writable" in result.output and "no-such-model" not in result.output
    assert "Traceback" not in result.output


def test_demo_refuses_bad_shared_options_and_an_all_skipped_run():
    """A wrong --dtype or --device is wrong for every model: one error, exit 2 (not a skip per model and exit 0);
    when no model loads at all the run is an error too."""
    from typer.testing import CliRunner

    from sinkscope.cli.app import app

    runner = CliRunner()
    for extra in (["--dtype", "float8"], ["--device", "gpu"]):
        res = runner.invoke(app, ["demo", "--models", "tiny:llama", *extra])
        assert res.exit_code == 2 and "skipping" not in res.output, res.output
    res = runner.invoke(app, ["demo", "--models", "no-such-model"])
    assert res.exit_code == 2 and "none of no-such-model could be loaded" in res.output
    res = runner.invoke(app, ["explain", "--model", "tiny:llama", "--text", "hi there", "--top-k", "0"])
    assert res.exit_code == 2


def test_pca_view_refuses_a_residual_layer_out_of_range():
    from sinkscope.analyses.tags import pca_view
    from sinkscope.models import tiny_model

    with pytest.raises(SinkscopeError, match="out of range"):
        pca_view(tiny_model("llama"), "hi there", 1, 0, residual_layer=10**12)


def test_eval_table_fits_an_80_column_terminal():
    """One row per dataset × variant: with two methods nothing is cut at 80 columns (it needed ~190 before)."""
    import pandas as pd
    from rich.console import Console

    from sinkscope.cli.evaluate import render_table2

    rows = [dict(dataset=d, variant=v, n=900, accuracy=0.82, mismatch=0.31, match=0.45, spearman=-0.12,
                 topk_overlap=0.3, n_causal=10) for d in ("sst2", "dbpedia") for v in ("before", "zscore",
                                                                                    "entropy_delta")]
    console = Console(width=80, record=True)
    console.print(render_table2(pd.DataFrame(rows), ["zscore", "entropy_delta"], "title"))
    text = console.export_text()
    assert "…" not in text and "entropy_delta" in text and "-0.12" in text and "82.0%" in text
    assert max(len(line) for line in text.splitlines()) <= 80
