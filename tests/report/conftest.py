"""Run folders of every command that writes one, from small runs on tiny:llama, built once per test session for the
report's section tests (HTML and browser)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MODEL = "tiny:llama"
PROMPTS = ["The cat sat on the mat.", "A second, longer prompt about a dog."]
EXAMPLES = [("great fun", "positive"), ("dull", "negative"), ("a charming, funny film", "positive"),
            ("boring and long", "negative")]


def _commands(data: Path, out: Path) -> dict[str, list[str]]:
    sst2 = ["--dataset", "sst2", "--data", str(data / "sst2.jsonl")]
    prompts = [x for p in PROMPTS for x in ("--prompt", p)]
    return {
        "eval": ["eval", "-m", MODEL, *sst2, "--limit", "3", "--causal-limit", "2", "--method", "zscore",
                 "--method", "mean_multiple"],
        "stream": ["stream", "-m", MODEL, "--text-file", str(data / "text.txt"), "--sink", "2", "--window", "8",
                   "--max-tokens", "40"],
        "tags": ["tags", "-m", MODEL, *prompts, "--pca-layer", "1"],
        "tags-sensitivity": ["tags-sensitivity", "-m", MODEL, *prompts, "--thresholds", "0.1,0.2,0.3", "--no-figures"],
        "mechanisms": ["mechanisms", "-m", MODEL, *prompts, "--ablate-layers", "0", "--ablate-heads", "0,1"],
        "calibrate": ["calibrate", "-m", MODEL, *sst2, "--calib", "2", "--heldout", "1", "--layers", "0,1",
                      "--top-layers", "1", "--save", str(out / "calibration.json")],
        "bench-mitigation": ["bench-mitigation", "-m", MODEL, *sst2, "--limit", "2", "--causal-limit", "1"],
    }


@pytest.fixture(scope="session")
def command_runs(tmp_path_factory) -> dict[str, Path]:
    """{command: its run folder} for eval, stream, tags, tags-sensitivity, mechanisms, calibrate and
    bench-mitigation."""
    from typer.testing import CliRunner

    from sinkscope.cli.app import app

    root = tmp_path_factory.mktemp("command-runs")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 6)
    (root / "sst2.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in EXAMPLES))
    runner = CliRunner()
    folders = {}
    for name, args in _commands(root, root).items():
        folder = root / name
        result = runner.invoke(app, [*args, "--out", str(folder)], catch_exceptions=False)
        assert result.exit_code == 0, f"{name}: {result.output}"
        folders[name] = folder
    return folders
