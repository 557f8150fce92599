"""The dormant and overmixing sections in a real browser: each report loads without console errors or network
requests and draws its heat map / line charts and tables."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sinkscope.cli.app import app
from sinkscope.report import write_report

runner = CliRunner()


def _load(browser: Any, folder: Path) -> list[str]:
    browser.get_log("browser")
    browser.get(write_report(folder).resolve().as_uri())
    for _ in range(200):
        if browser.execute_script("return document.documentElement.dataset.ready === '1'"):
            break
        time.sleep(0.05)
    logs = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return logs + list(browser.execute_script("return (window.SINKSCOPE || {}).errors || []"))


def _count(browser: Any, selector: str) -> int:
    return int(browser.execute_script("return document.querySelectorAll(arguments[0]).length", selector))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sink-views")
    prose = root / "prose.txt"
    prose.write_text("The cat sat on the mat.\nA dog ran in the park today.\n")
    lines = {"dormant": ["dormant", "--model", "tiny:llama", "--domain", f"prose={prose}", "--datasets", "sst2",
                         "--data", str(root / "sst2.jsonl"), "--max-tokens", "12", "--no-figures"],
             "overmixing": ["overmixing", "--model", "tiny:llama", "--prompt", "The cat sat on the mat and purred.",
                            "--max-tokens", "12"]}
    (root / "sst2.jsonl").write_text('{"text": "great fun", "label": "positive"}\n'
                                     '{"text": "a dull film", "label": "negative"}\n')
    out = {}
    for name, line in lines.items():
        out[name] = root / name
        result = runner.invoke(app, [*line, "--out", str(out[name])])
        assert result.exit_code == 0, result.output
    return out


def test_dormant_section_in_browser(browser, runs) -> None:
    assert _load(browser, runs["dormant"]) == []
    assert _count(browser, "#sec-dormant canvas.ss-heat") == 1
    assert _count(browser, "#sec-dormant table") >= 1


def test_overmixing_section_in_browser(browser, runs) -> None:
    assert _load(browser, runs["overmixing"]) == []
    assert _count(browser, "#sec-overmixing .ss-om-charts svg") == 4
    assert _count(browser, "#sec-overmixing img") == 1  # the figure, inline
    names = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert [n for n in names if not n.startswith("data:")] == []
