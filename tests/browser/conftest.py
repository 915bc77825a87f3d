"""A headless Chromium driven by Selenium (Debian's chromium and chromium-driver packages).

Without the browser the tests skip, except under CI (``CI=true``), where a missing browser is a
failure: README's test command installs it. Screenshots go to ``$FCNSEG_SCREENSHOTS`` when it is set,
else to the test's temporary folder.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.browser.helpers import chromium_paths, start_chromium
from tests.conftest import on_ci


def _missing(what: str) -> None:
    message = f"{what} is not installed (apt-get install -y chromium chromium-driver; pip install selenium)"
    if on_ci():
        pytest.fail(message + "; CI=true requires the browser tests to run")
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser():
    if importlib.util.find_spec("selenium") is None:
        _missing("selenium")
    binary, driver_path = chromium_paths()
    if binary is None or driver_path is None:
        _missing("chromium" if binary is None else "chromedriver")
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    folder = Path(os.environ.get("FCNSEG_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
