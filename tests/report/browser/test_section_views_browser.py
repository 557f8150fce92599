"""Each command's report section in headless Chromium (issue #19): the report of a small run of each command opens
without console errors or network requests, shows its section, and clicks through grid → map → token view where the
page has them; a screenshot of each section goes to $SINKSCOPE_ARTIFACTS (else a pytest temporary folder)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sinkscope.report import write_report
from sinkscope.store import load_run


def open_report(browser: Any, folder: Path) -> Any:
    """Load the folder's report, wait for its script, and return the page's SINKSCOPE errors + console errors."""
    browser.get_log("browser")
    browser.get(write_report(folder).resolve().as_uri())
    for _ in range(200):
        if browser.execute_script("return document.documentElement.dataset.ready === '1'"):
            return
        time.sleep(0.05)
    pytest.fail(f"the report's script never finished: {errors(browser)}")


def errors(browser: Any) -> list[str]:
    logs = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return logs + list(browser.execute_script("return (window.SINKSCOPE || {}).errors || []"))


def fetched(browser: Any) -> list[str]:
    """What the page requested besides itself (inline data: URIs are not requests)."""
    names = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    return [n for n in names if not n.startswith("data:")]


def count(browser: Any, selector: str) -> int:
    return int(browser.execute_script("return document.querySelectorAll(arguments[0]).length", selector))


def hover_text(browser: Any, element: Any) -> str:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(element).perform()
    tip = browser.find_element("id", "ss-tip")
    return tip.text if tip.is_displayed() else ""


def click_cell(browser: Any, canvas: Any, row: int, col: int) -> None:
    """Click a heat map's cell where a user would (Selenium's offsets are from the element's centre)."""
    from selenium.webdriver.common.action_chains import ActionChains

    x, y = browser.execute_script("return arguments[0].cellCentre(arguments[1], arguments[2])", canvas, row, col)
    size = canvas.size
    ActionChains(browser).move_to_element_with_offset(canvas, int(x - size["width"] / 2),
                                                      int(y - size["height"] / 2)).click().perform()


def shoot(browser: Any, section: Any, path: Path) -> Path:
    """A PNG of the section (the window grown to the page's height so all of it renders)."""
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.set_window_size(1400, min(max(height, 600), 8000))
    try:
        section.screenshot(str(path))
    finally:
        browser.set_window_size(1400, 1000)
    assert path.stat().st_size > 5_000
    return path


def figures_loaded(browser: Any, section: Any) -> int:
    """How many of the section's inline figures decoded (and that none failed)."""
    sizes = browser.execute_script("return Array.from(arguments[0].querySelectorAll('.ss-figures img'))"
                                   ".map((i) => i.naturalWidth)", section)
    assert all(w > 0 for w in sizes), sizes
    return len(sizes)


def test_eval_section_in_browser(browser, command_runs, artifacts):
    run = load_run(command_runs["eval"])
    open_report(browser, command_runs["eval"])
    sec = browser.find_element("id", "sec-eval")
    assert count(browser, "#sec-eval .ss-eval-table tbody tr") == 3  # Table 2: before + two methods
    assert count(browser, "#sec-eval .ss-eval-bars rect.ss-bar-rect") > 0
    assert count(browser, "#sec-eval .ss-eval-scatter .ss-point") == 2 * 2  # two causal examples × two methods
    # grid (the examples) → token view
    row = sec.find_elements("css selector", ".ss-eval-examples tbody tr")[0]
    example = row.find_elements("css selector", "td")[1].text
    row.click()
    n = int((run["tokens"]["example_id"] == example).sum())
    assert count(browser, "#sec-eval .ss-eval-detail .ss-eval-strip") >= 3
    strips = sec.find_elements("css selector", ".ss-eval-detail .ss-eval-strip")
    assert len(strips[0].find_elements("css selector", ".ss-tok")) == n
    assert hover_text(browser, strips[0].find_elements("css selector", ".ss-tok")[2]).startswith("position 2")
    # map (the causal-alignment scatter) → that example's token view, with its causal strip and per-token scatter
    sec.find_elements("css selector", ".ss-eval-scatter .ss-point")[-1].click()  # the topmost
    title = sec.find_element("css selector", ".ss-eval-detail h3").text
    assert title.startswith("Example sst2/") and count(browser, "#sec-eval .ss-eval-detail svg") == 1
    assert errors(browser) == [] and fetched(browser) == []
    shoot(browser, sec, artifacts / "section-eval.png")


def test_stream_section_in_browser(browser, command_runs, artifacts):
    open_report(browser, command_runs["stream"])
    sec = browser.find_element("id", "sec-stream")
    assert count(browser, "#sec-stream .ss-stream-loss svg path[stroke-width]") >= 3
    assert count(browser, "#sec-stream .ss-stream-loss .ss-vline") == 1
    smooth = sec.find_element("css selector", ".ss-stream-smooth")
    browser.execute_script("arguments[0].value = '1'; arguments[0].dispatchEvent(new Event('change'))", smooth)
    assert count(browser, "#sec-stream .ss-stream-loss .ss-vline") == 1
    assert count(browser, "#sec-stream .ss-stream-ppl rect.ss-bar-rect") == 6
    assert errors(browser) == [] and fetched(browser) == []
    shoot(browser, sec, artifacts / "section-stream.png")


def test_tags_section_in_browser(browser, command_runs, artifacts):
    run = load_run(command_runs["tags"])
    open_report(browser, command_runs["tags"])
    sec = browser.find_element("id", "sec-tags")
    canvas = sec.find_element("css selector", ".ss-tags-grid canvas")
    sinks = run["sinks"]
    layer, head = int(sinks["layer"].iloc[0]), int(sinks["head"].iloc[0])
    # grid → the head's sinks (map) → token view of prompt 0 with the head's sinks marked
    click_cell(browser, canvas, layer, head)
    panel = sec.find_element("css selector", ".ss-tags-head")
    assert panel.is_displayed() and panel.find_element("css selector", "h3").text == f"Layer {layer}, head {head}"
    assert len(panel.find_elements("css selector", "tbody tr")) == len(sinks[(sinks["layer"] == layer) &
                                                                           (sinks["head"] == head)])
    n = len(run["pca"])
    assert count(browser, "#sec-tags .ss-tags-head .ss-tags-tok .ss-tok") == n
    mine = sinks[(sinks["layer"] == layer) & (sinks["head"] == head) & (sinks["prompt_id"] == 0)]
    assert count(browser, "#sec-tags .ss-tags-head .ss-tags-tok .ss-sink") == len(mine)
    assert count(browser, "#sec-tags .ss-tags-pca .ss-point") == n
    assert count(browser, "#sec-tags .ss-tags-pca-tok .ss-tok") == n
    assert figures_loaded(browser, sec) == 2
    assert errors(browser) == [] and fetched(browser) == []
    shoot(browser, sec, artifacts / "section-tags.png")
    open_report(browser, command_runs["tags-sensitivity"])
    sec = browser.find_element("id", "sec-tags")
    assert count(browser, "#sec-tags .ss-tags-sens svg") == 3
    assert errors(browser) == [] and fetched(browser) == []
    shoot(browser, sec, artifacts / "section-tags-sensitivity.png")


def test_mechanisms_section_in_browser(browser, command_runs, artifacts):
    run = load_run(command_runs["mechanisms"])
    open_report(browser, command_runs["mechanisms"])
    sec = browser.find_element("id", "sec-mechanisms")
    canvas = sec.find_element("css selector", ".ss-mech-map canvas")
    # grid (sites × positions) → the token's norm over depth (map) → token view at that site
    click_cell(browser, canvas, 2, 0)
    panel = sec.find_element("css selector", ".ss-mech-cell")
    assert panel.is_displayed() and panel.find_element("css selector", "h3").text.startswith("Position 0 ")
    assert count(browser, "#sec-mechanisms .ss-mech-cell svg") == 1
    n = int(run["prompts"]["n_tokens"].iloc[0])
    assert count(browser, "#sec-mechanisms .ss-mech-tok .ss-tok") == n
    assert count(browser, "#sec-mechanisms .ss-mech-tok .ss-sink") == 1  # the chosen token
    for part in (".ss-mech-p0 svg", ".ss-mech-bos-a svg", ".ss-mech-abl rect.ss-bar-rect", ".ss-mech-massive svg"):
        assert count(browser, f"#sec-mechanisms {part}") >= 1, part
    assert figures_loaded(browser, sec) == len(run.manifest["parameters"]["figures"])
    assert errors(browser) == [] and fetched(browser) == []
    shoot(browser, sec, artifacts / "section-mechanisms.png")


def test_calibrate_and_mitigation_sections_in_browser(browser, command_runs, artifacts):
    search = load_run(command_runs["calibrate"])["search"]
    open_report(browser, command_runs["calibrate"])
    sec = browser.find_element("id", "sec-calibrate")
    assert count(browser, "#sec-calibrate .ss-cal-trials rect.ss-bar-rect") == int((search["accuracy"] > 0).sum()) \
        or count(browser, "#sec-calibrate .ss-cal-trials svg") == 1
    assert count(browser, "#sec-calibrate .ss-cal-search tbody tr") == len(search)
    assert errors(browser) == [] and fetched(browser) == []
    shoot(browser, sec, artifacts / "section-calibrate.png")
    table = load_run(command_runs["bench-mitigation"])["mitigation"]
    open_report(browser, command_runs["bench-mitigation"])
    sec = browser.find_element("id", "sec-bench-mitigation")
    assert count(browser, "#sec-bench-mitigation .ss-mit-table tbody tr") == len(table)
    header = next(b for b in sec.find_elements("css selector", ".ss-mit-table th button") if b.text == "cost_vs_none")
    header.click()
    j = table.columns.get_loc("cost_vs_none") + 1
    values = [float(td.text) for td in sec.find_elements("css selector", f".ss-mit-table tbody td:nth-child({j})")]
    assert values == sorted(values)
    barred = browser.execute_script("return Array.from(arguments[0].querySelectorAll('.ss-mit-table td'))"
                                    ".filter((td) => td.style.background.includes('gradient')).length", sec)
    assert barred >= len(table)
    assert errors(browser) == [] and fetched(browser) == []
    shoot(browser, sec, artifacts / "section-bench-mitigation.png")
