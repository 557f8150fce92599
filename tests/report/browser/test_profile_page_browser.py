"""The page of `sinkscope profile --out` for a short prompt, in headless Chromium (#19 item 2): clicking a head shows
its attention map with token labels on both axes (profile stores maps for short prompts) and zooms; the grid's
scale legend states what the colour means and its range; the token view offers every detector of `sinkscope
detectors`, each flagging the same keys as `sinkscope.detect`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sinkscope.detect import detect, list_detectors
from sinkscope.report.data import head_metrics
from sinkscope.store import load_run

PROMPT = "The quick brown fox jumps."  # 27 tokens for tiny:llama's byte-level tokenizer


def open_page(browser: Any, path: Path) -> None:
    browser.get(path.resolve().as_uri())
    for _ in range(200):
        if browser.execute_script("return document.documentElement.dataset.ready === '1'"):
            return
        time.sleep(0.05)
    pytest.fail(f"the report's script never finished; errors: {console_errors(browser)}")


def console_errors(browser: Any) -> list[str]:
    logs = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return logs + list(browser.execute_script("return (window.SINKSCOPE || {}).errors || []"))


def count(browser: Any, selector: str) -> int:
    return int(browser.execute_script("return document.querySelectorAll(arguments[0]).length", selector))


def screenshot(browser: Any, element: Any, path: Path) -> Path:
    browser.execute_script("arguments[0].scrollIntoView()", element)
    assert element.screenshot(str(path))
    return path


@pytest.fixture(scope="module")
def profile_page(tmp_path_factory) -> Path:
    """report.html of `sinkscope profile -m tiny:llama --prompt PROMPT --out RUN`, as a user makes it."""
    from typer.testing import CliRunner

    from sinkscope.cli.app import app

    folder = tmp_path_factory.mktemp("profile-page") / "run"
    result = CliRunner().invoke(app, ["profile", "-m", "tiny:llama", "--prompt", PROMPT, "--out", str(folder)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (folder / "maps.parquet").is_file()
    return folder / "report.html"


def test_a_click_on_a_head_shows_its_labelled_map(browser: Any, profile_page: Path, artifacts: Path) -> None:
    keys = load_run(profile_page.parent)["keys"]
    tokens = keys[(keys["layer"] == 0) & (keys["head"] == 0)].sort_values("position")["token"].tolist()
    L, H, n = int(keys["layer"].max()) + 1, int(keys["head"].max()) + 1, len(tokens)
    assert n <= 64
    browser.get_log("browser")
    open_page(browser, profile_page)
    assert console_errors(browser) == []
    cells = browser.find_elements("css selector", "#ss-grid .ss-cell")
    assert len(cells) == L * H
    cells[H + 1].click()  # layer 1, head 1
    panel = browser.find_element("id", "ss-head")
    assert "No attention maps" not in panel.text and "Attention map, prompt 0" in panel.text
    assert count(browser, "#ss-head canvas.ss-map") == 1
    shown = browser.execute_script("return window.SINKSCOPE.mapShown()")
    assert shown["n"] == n and shown["every"] == 1 and shown["cell"] >= 14  # every token labelled, cells readable
    assert shown["labels"] == [f"{t.replace(' ', '␣')} {i}" for i, t in enumerate(tokens)]  # token and position
    assert shown["width"] == shown["height"] >= 14 * n
    assert "attention weight" in panel.text and "row sums to 1" in panel.text
    panel.find_element("css selector", "button.ss-zoom-in").click()
    assert browser.execute_script("return window.SINKSCOPE.mapShown().cell") > shown["cell"]
    screenshot(browser, browser.find_element("id", "sec-grid"), artifacts / "report-profile-grid-map.png")
    shot = screenshot(browser, panel, artifacts / "report-profile-map.png")
    assert shot.stat().st_size > 10_000
    assert console_errors(browser) == []


def test_the_grid_scale_states_its_meaning_and_range(browser: Any, profile_page: Path) -> None:
    keys = load_run(profile_page.parent)["keys"]
    highest = float(head_metrics(keys)["sink_mass"].max())
    open_page(browser, profile_page)
    scale = browser.find_element("id", "ss-grid-scale").text
    assert scale.startswith("Colour: mass on sinks") and f"to {highest:.4f}" in scale
    assert "can exceed 1" in scale and "column means" in scale
    assert browser.execute_script("return window.SINKSCOPE.gridScale.hi") == pytest.approx(highest, abs=1e-6)
    select = browser.find_element("id", "ss-grid-metric")
    for option in select.find_elements("css selector", "option"):
        option.click()
        text = browser.find_element("id", "ss-grid-scale").text
        assert option.text in text and ("[0, 1]" in text or "can exceed 1" in text), text


def test_the_token_view_offers_every_detector(browser: Any, profile_page: Path) -> None:
    keys = load_run(profile_page.parent)["keys"]
    L, H, n = int(keys["layer"].max()) + 1, int(keys["head"].max()) + 1, int(keys["position"].max()) + 1
    rows = np.zeros((L, H, n))
    rows[keys["layer"], keys["head"], keys["position"]] = keys["last_row"]
    open_page(browser, profile_page)
    offered = browser.execute_script(
        "return Array.from(document.querySelectorAll('#ss-tok-method option')).map((o) => o.value)")
    assert offered == list_detectors() and len(offered) == 6
    thresholds = {"zscore": 1.0, "mean_multiple": 2.0, "entropy_delta": 0.05, "column_mass": 0.1, "act": 0.05,
                  "sink_rate": 0.1}
    params = {"zscore": "alpha", "mean_multiple": "theta", "entropy_delta": "tau", "column_mass": "eps",
              "act": "threshold", "sink_rate": "eps"}
    flagged = 0
    for method in offered:
        got = browser.execute_script("return window.SINKSCOPE.setTokenView(arguments[0])",
                                     {"prompt": 0, "layers": "all", "heads": "all", "method": method,
                                      "threshold": thresholds[method]})
        assert browser.find_element("id", "ss-tok-param").text == params[method]
        assert method in browser.find_element("id", "ss-tok-detector").text
        a = torch.tensor(got["a"], dtype=torch.float64)
        if method == "sink_rate":
            rate = detect("sink_rate", torch.tensor(rows), eps=thresholds[method])  # [key]
            np.testing.assert_allclose(got["rate"], rate.numpy(), atol=1e-12)
            want = (rate >= 0.5).tolist()
        else:
            want = detect(method, a, **{params[method]: thresholds[method]}).tolist()
        assert got["sinks"] == want, method
        flagged += sum(want)
    assert flagged > 0
    assert console_errors(browser) == []
