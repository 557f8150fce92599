"""The CLI end to end on a tiny model: printed summaries, run folders, one-line errors with exit code 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from sinkscope.cli.app import app
from sinkscope.cli.options import parse_selection

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_profile_prints_layers_and_writes_run(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on the mat.\n\nA second, fine prompt.\n")
    out = tmp_path / "run"
    result = invoke("profile", "--model", "tiny:llama", "--prompts", str(prompts), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "heads with sink" in result.output and "skipped prompt 2: empty prompt" in result.output
    for layer in ("0", "1"):
        assert any(line.strip("│┃ ").startswith(layer) for line in result.output.splitlines())
    manifest = json.loads((out / "manifest.json").read_text())
    keys = pd.read_parquet(out / "keys.parquet")
    n_tokens = pd.read_parquet(out / "prompts.parquet")["n_tokens"].sum()
    assert len(keys) == n_tokens * 2 * 4 == manifest["tables"]["keys"]
    assert {"prompt_id", "layer", "head", "position", "token", "alpha"} <= set(keys.columns)


def test_profile_without_out_prints_summary_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("profile", "-m", "tiny:gpt2", "--prompt", "hello there", "--method", "zscore", "--threshold", "1.5")
    assert result.exit_code == 0, result.output
    assert "'alpha': 1.5" in result.output
    assert list(tmp_path.iterdir()) == []


def test_explain_prints_before_after_and_top_k(tmp_path):
    out = tmp_path / "ex"
    result = invoke("explain", "-m", "tiny:llama", "--text", "The movie was great.", "--top-k", "5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "before:" in result.output and "after:" in result.output and "top-5 tokens" in result.output
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert tokens["after"].sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "-m", "tiny:llama"], "no prompts"),
        (["profile", "-m", "tiny:llama", "--prompt", "hi", "--method", "nope"], "unknown detector"),
        (["profile", "-m", "tiny:llama", "--prompt", "hi", "--threshold", "7"], "eps must be"),
        (["profile", "-m", "tiny:llama", "--prompt", "x" * 700], "context"),
        (["profile", "-m", "no-org/no-model", "--prompt", "hi"], "Hub"),
        (["explain", "-m", "tiny:llama", "--text", ""], "empty"),
        (["explain", "-m", "tiny:llama", "--text", "hi", "--layers", "abc"], "selection"),
    ],
)
def test_user_errors_are_one_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_help_for_every_command():
    for command in ("profile", "explain", "models", "detectors"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_listing_commands():
    assert "tiny:llama" in invoke("models").output
    assert "column_mass" in invoke("detectors").output


def test_parse_selection():
    assert parse_selection("all") is None
    assert parse_selection("-1") == [-1]
    assert parse_selection("0,2") == [0, 2]
    assert parse_selection("3-5") == [3, 4, 5]
