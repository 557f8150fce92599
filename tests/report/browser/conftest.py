"""A headless Debian Chromium driven by Selenium + chromedriver, for the report's browser tests.

Nothing is downloaded at run time: the browser and the driver come from the system (`apt-get install chromium
chromium-driver`; override with SINKSCOPE_CHROMIUM / SINKSCOPE_CHROMEDRIVER). Without them, or without the
`selenium` package, the tests skip with the reason, unless SINKSCOPE_REQUIRE_BROWSER=1 (CI sets it, so a broken
install fails instead of skipping). Screenshots go to $SINKSCOPE_ARTIFACTS (CI uploads that
folder), else to pytest's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

# The flags the network-closed CI machine needs; --user-data-dir is added per browser (a new empty folder).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("SINKSCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SINKSCOPE_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _find(env: str, names: list[str], fallback: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).is_file() else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return fallback if Path(fallback).is_file() else None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium WebDriver (one per test session), or skip with the reason."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("the selenium package is not installed (pip install selenium; CI installs it)")

    binary = _find("SINKSCOPE_CHROMIUM", ["chromium", "chromium-browser"], "/usr/bin/chromium")
    driver_path = _find("SINKSCOPE_CHROMEDRIVER", ["chromedriver"], "/usr/bin/chromedriver")
    if binary is None or driver_path is None:
        missing = "chromium" if binary is None else "chromedriver"
        _unavailable(f"{missing} not found: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver) to run the browser tests; CI installs them")
    profile = tempfile.mkdtemp(prefix="sinkscope-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which would download a driver) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Where screenshots go: $SINKSCOPE_ARTIFACTS if set (CI keeps it), else a pytest temporary folder."""
    folder = Path(os.environ.get("SINKSCOPE_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
