"""Open generated reports in headless Chromium: no console errors, the grid and token view render with the right
number of cells and tokens, hovering shows a tooltip, the page's detect-mask-renormalise equals Python's, and a
32-layer × 32-head, 2,000-token report stays responsive. Screenshots are saved as artifacts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope.analyses.maps import add_maps, capture_maps
from sinkscope.analyses.mitigate import aggregate_rows, detect_mask_renormalise
from sinkscope.report import SectionContent, table_html, write_report
from sinkscope.store import Run, load_run, save_run

PROMPTS = [
    "Classify the sentiment as positive or negative. Sentence: a charming, funny film. Sentiment:",
    "The quick brown fox jumps over the lazy dog.",
]
SECTION_SCRIPT = "el.dataset.ran = String(data.n); ss.tip(el.querySelector('p'), 'from a section');"


@pytest.fixture(scope="module")
def demo_report(tiny_llama, tmp_path_factory) -> Path:
    """A profile run folder of the tiny Llama with maps, plus a contributed section; returns report.html."""
    from sinkscope.analyses.profile import profile

    result = profile(tiny_llama, PROMPTS)
    run = add_maps(result.run(tiny_llama, command="demo"), capture_maps(tiny_llama, PROMPTS, max_tokens=128))
    folder = save_run(tmp_path_factory.mktemp("browser") / "tiny", run)
    accuracy = pd.DataFrame({"task": ["sst2", "boolq", "rte"], "accuracy": [0.61, 0.83, 0.52]})
    section = SectionContent(html="<p>Contributed section.</p>" + table_html(accuracy, "acc"), data={"n": 3},
                             script=SECTION_SCRIPT)
    return write_report(folder, extra={"Evaluation": section})


def open_page(browser: Any, path: Path) -> float:
    """Load the report and wait for its script to finish; returns the load time in seconds."""
    start = time.perf_counter()
    browser.get(path.resolve().as_uri())
    for _ in range(200):
        if browser.execute_script("return document.documentElement.dataset.ready === '1'"):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the report's script never finished; errors: {console_errors(browser)}")
    return time.perf_counter() - start


def console_errors(browser: Any) -> list[str]:
    logs = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return logs + list(browser.execute_script("return (window.SINKSCOPE || {}).errors || []"))


def hover(browser: Any, element: Any) -> str:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(element).perform()
    tip = browser.find_element("id", "ss-tip")
    return tip.text if tip.is_displayed() else ""


def screenshot(browser: Any, path: Path, hover_on: Any = None) -> Path:
    """A full-page PNG (the window grown to the page's height), hovering `hover_on` so a tooltip shows."""
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.set_window_size(1400, min(max(height, 600), 8000))
    try:
        if hover_on is not None:
            hover(browser, hover_on)
        assert browser.save_screenshot(str(path))
    finally:
        browser.set_window_size(1400, 1000)
    return path


def count(browser: Any, selector: str) -> int:
    return int(browser.execute_script("return document.querySelectorAll(arguments[0]).length", selector))


def test_demo_report_renders(browser, demo_report, artifacts):
    run = load_run(demo_report.parent)
    keys = run["keys"]
    L, H = int(keys["layer"].max()) + 1, int(keys["head"].max()) + 1
    n0 = int(keys.loc[keys["prompt_id"] == 0, "position"].max()) + 1
    browser.get_log("browser")  # drop anything from earlier pages
    open_page(browser, demo_report)
    assert console_errors(browser) == []
    assert count(browser, "#ss-grid .ss-cell") == L * H
    assert count(browser, "#ss-before .ss-tok") == n0 and count(browser, "#ss-after .ss-tok") == n0
    assert count(browser, "#ss-before .ss-sink") >= 1
    cells = browser.find_elements("css selector", "#ss-grid .ss-cell")
    text = hover(browser, cells[H + 1])  # layer 1, head 1
    assert text.startswith("layer 1, head 1") and "sinks:" in text
    token = browser.find_elements("css selector", "#ss-before .ss-tok")[3]
    assert hover(browser, token).startswith("position 3")
    cells[H + 1].click()  # the head panel: this head's attention map
    assert count(browser, "#ss-head.ss-open canvas") >= 1
    assert "Attention map" in browser.find_element("id", "ss-head").text
    browser.find_element("css selector", "#ss-head button").click()  # "Show this head in the token view"
    assert browser.execute_script("return [window.SINKSCOPE.last.layers, window.SINKSCOPE.last.heads]") == [[1], [1]]
    # the contributed section ran its script and rendered its table; tables sort on click
    section = browser.find_element("id", "sec-extra-0")
    assert section.get_attribute("data-ran") == "3"
    header = section.find_elements("css selector", "th button")[1]
    header.click()
    values = [float(td.text) for td in section.find_elements("css selector", "tbody td:nth-child(2)")]
    assert values == sorted(values)
    header.click()
    values = [float(td.text) for td in section.find_elements("css selector", "tbody td:nth-child(2)")]
    assert values == sorted(values, reverse=True)
    assert count(browser, "#ss-curves svg") == 1
    assert console_errors(browser) == []
    shot = screenshot(browser, artifacts / "report-demo.png", hover_on=cells[H + 1])
    assert shot.stat().st_size > 10_000


CASES = [
    ({"layers": "-1", "heads": "all", "method": "zscore", "threshold": 2.0}, 0),
    ({"layers": "all", "heads": "all", "method": "zscore", "threshold": 1.0}, 0),
    ({"layers": "0", "heads": "1,3", "method": "zscore", "threshold": 0.5}, 1),
    ({"layers": "0-1", "heads": "2", "method": "mean_multiple", "threshold": 3.0}, 1),
    ({"layers": "-1", "heads": "0", "method": "mean_multiple", "threshold": 5.0}, 0),
]


def test_token_view_matches_python(browser, demo_report):
    """The page's aggregation and detect-mask-renormalise (JS) against sinkscope.analyses.mitigate (Python)."""
    keys = load_run(demo_report.parent)["keys"]
    open_page(browser, demo_report)
    flagged = 0
    for selection, prompt in CASES:
        got = browser.execute_script("return window.SINKSCOPE.setTokenView(arguments[0])",
                                     {**selection, "prompt": prompt})
        sub = keys[keys["prompt_id"] == prompt]
        L, H, n = int(sub["layer"].max()) + 1, int(sub["head"].max()) + 1, int(sub["position"].max()) + 1
        rows = np.zeros((L, H, n))
        rows[sub["layer"], sub["head"], sub["position"]] = sub["last_row"]
        layers = list(range(L)) if selection["layers"] == "all" else got["layers"]
        heads = list(range(H)) if selection["heads"] == "all" else got["heads"]
        a = aggregate_rows(torch.tensor(rows), layers, heads)
        np.testing.assert_allclose(got["a"], a.numpy(), atol=1e-12, err_msg=str(selection))
        param = {"zscore": "alpha", "mean_multiple": "theta"}[selection["method"]]
        ref = detect_mask_renormalise(torch.tensor(got["a"], dtype=torch.float64), selection["method"],
                                      **{param: selection["threshold"]})
        assert got["sinks"] == ref.sinks.tolist(), selection
        np.testing.assert_allclose(got["b"], ref.b.numpy(), atol=1e-12, err_msg=str(selection))
        assert count(browser, "#ss-after .ss-sink") == sum(got["sinks"])
        flagged += sum(got["sinks"])
    assert flagged > 0
    assert browser.execute_script("return window.SINKSCOPE.parseSel('3-6', 8).join(',')") == "3,4,5,6"
    assert browser.execute_script("return window.SINKSCOPE.parseSel('-1', 8).join(',')") == "7"
    assert console_errors(browser) == []


@pytest.mark.slow
def test_large_report_is_responsive(browser, tmp_path, artifacts):
    """32 layers × 32 heads and a 2,000-token prompt: the page loads and re-renders quickly."""
    from sinkscope.report.synthetic import synthetic_run

    path = write_report(synthetic_run(32, 32, 2000), tmp_path / "large")
    assert path.stat().st_size < 8_000_000
    load = open_page(browser, path)
    assert console_errors(browser) == []
    timings = browser.execute_script("return window.SINKSCOPE.timings")
    assert load < 20 and timings["total"] < 5_000, (load, timings)
    assert count(browser, "#ss-grid .ss-cell") == 32 * 32
    assert count(browser, "#ss-before .ss-tok") == 2000 and count(browser, "#ss-after .ss-tok") == 2000
    start = time.perf_counter()
    got = browser.execute_script("return window.SINKSCOPE.setTokenView({layers: 'all', heads: 'all'})")
    assert time.perf_counter() - start < 5
    assert len(got["a"]) == 2000 and abs(sum(got["b"]) - 1) < 1e-9
    assert browser.execute_script("return window.SINKSCOPE.timings.tokens") < 2_000
    cell = browser.find_elements("css selector", "#ss-grid .ss-cell")[31 * 32 + 5]
    assert hover(browser, cell).startswith("layer 31, head 5")
    cell.click()
    assert count(browser, "#ss-head.ss-open canvas") == 1  # no maps: the head's attention row
    assert console_errors(browser) == []
    screenshot(browser, artifacts / "report-large.png", hover_on=cell)


def test_other_runs_render_cleanly(browser, tmp_path):
    """An explain run (static token view), an eval-like run with a norms table, and a run with no known table."""
    tokens = pd.DataFrame({"prompt_id": 0, "position": range(5), "token": ["<s>", "Hi", "\n", " there", "!"],
                           "before": [0.6, 0.1, 0.1, 0.1, 0.1], "after": [0.0, 0.25, 0.25, 0.25, 0.25],
                           "sink": [True, False, False, False, False]})
    explain_page = write_report(Run(tables={"tokens": tokens}, manifest={"command": "explain"}), tmp_path / "explain")
    open_page(browser, explain_page)
    assert console_errors(browser) == []
    assert count(browser, "#ss-before .ss-tok") == 5 and count(browser, "#ss-after .ss-sink") == 1
    assert count(browser, "#ss-grid") == 0
    norms = pd.DataFrame({"layer": [0, 0, 1, 1], "position": [0, 1, 0, 1], "norm": [1.0, 1.0, 9.0, 1.2]})
    accuracy = pd.DataFrame({"task": ["a", "b"], "accuracy": [0.5, 0.9]})
    eval_page = write_report(Run(tables={"accuracy": accuracy, "norms": norms}, manifest={"command": "eval"}),
                             tmp_path / "eval")
    open_page(browser, eval_page)
    assert console_errors(browser) == []
    assert count(browser, "#ss-chart-norms svg") == 1 and count(browser, "#sec-tables table") == 2
    empty_page = write_report(Run(tables={}, manifest={}), tmp_path / "empty")
    open_page(browser, empty_page)
    assert console_errors(browser) == []
