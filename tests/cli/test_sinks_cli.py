"""`sinkscope dormant` and `sinkscope overmixing` end to end on a tiny model (issue #18 items 1-2): the run folder's
Parquet tables with the shared key columns, the figure listed in the manifest, and the report section built from the
folder alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sinkscope.cli.app import app
from sinkscope.store import load_run

runner = CliRunner()
MODEL = "tiny:llama"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_dormant_run_folder_and_report(tmp_path: Path) -> None:
    from sinkscope.report import write_report

    prose = tmp_path / "prose.txt"
    prose.write_text("The cat sat on the mat.\nA dog ran in the park today.\n")
    code = tmp_path / "code.jsonl"
    code.write_text('{"text": "def f(x): return x + 1"}\n{"text": "for i in range(3): print(i)"}\n')
    out = tmp_path / "run"
    result = runner.invoke(app, ["dormant", "--model", MODEL, "--domain", f"prose={prose}", "--domain",
                                 f"code={code}", "--max-tokens", "12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "heads per domain" in result.output
    run = load_run(out)
    assert {"head_domains", "domain_switch", "prompt_heads", "residual", "prompts"} <= set(run.tables)
    assert {"prompt_id", "layer", "head", "position", "token"} <= set(run["prompt_heads"].columns)
    assert {"prompt_id", "layer", "position", "token"} <= set(run["residual"].columns)
    assert set(run["head_domains"]["domain"]) == {"prose", "code"}
    assert "head_domains.png" in run.manifest["files"]
    page = write_report(out).read_text()
    assert "Active and dormant heads" in page and "head_domains.png" in page
    bad = runner.invoke(app, ["dormant", "--model", MODEL, "--domain", "prose"])
    assert bad.exit_code == 2 and "NAME=FILE" in bad.stderr


def test_overmixing_run_folder_and_report(tmp_path: Path) -> None:
    from sinkscope.report import write_report

    out = tmp_path / "run"
    result = runner.invoke(app, ["overmixing", "--model", MODEL, "--prompt", "The cat sat on the mat and purred.",
                                 "--prompt", "Attention sinks draw mass.", "--position", "2", "--max-tokens", "16",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "masking the sink multiplies the spread" in result.output
    run = load_run(out)
    assert {"spread", "layer_entropy", "layers"} <= set(run.tables)
    assert {"prompt_id", "layer", "position", "token", "condition"} <= set(run["spread"].columns)
    assert set(run["layers"]["condition"]) == {"intact", "masked"}
    assert "overmixing.png" in run.manifest["files"]
    page = write_report(out).read_text()
    assert "Over-mixing and representation entropy" in page and "overmixing.png" in page
    bad = runner.invoke(app, ["overmixing", "--model", MODEL, "--prompt", "hi there", "--position", "0"])
    assert bad.exit_code == 2 and "--sink" in bad.stderr
