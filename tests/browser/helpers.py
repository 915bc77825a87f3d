"""Driving Chromium: start it headless (Debian's chromium + chromium-driver, through Selenium), wait
for the serve page's states, save screenshots small enough for the docs."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

WINDOW = (1280, 860)
SCREENSHOT_BYTES = 300_000


def chromium_paths() -> tuple[str | None, str | None]:
    """The browser and its driver on PATH (None when absent)."""
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def start_chromium():
    """A headless Chromium under Selenium, its console log kept (``driver.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-extensions", "--no-first-run", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                     "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    return driver


def wait_for_state(driver, states: tuple[str, ...], timeout: float = 60) -> str:
    """Waits until the serve page's ``body[data-state]`` is one of ``states``; returns it."""
    from selenium.webdriver.support.ui import WebDriverWait

    def state(d) -> str:
        return d.find_element("tag name", "body").get_attribute("data-state")

    WebDriverWait(driver, timeout).until(lambda d: state(d) in states)
    return state(driver)


def then_wait(driver, action, states: tuple[str, ...] = ("done", "error")) -> str:
    """Runs ``action`` and waits for the page to reach one of ``states`` again (not still be there)."""
    driver.execute_script("document.body.dataset.state = 'test: waiting for the page'")
    action()
    return wait_for_state(driver, states)


def save_screenshot(driver, path: Path) -> Path:
    """The window as a PNG, reduced to a palette image when that keeps it under `SCREENSHOT_BYTES`."""
    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as shot:
        shot = shot.convert("RGB")
        assert np.asarray(shot).std() > 5, "a blank page"
        shot.save(path, optimize=True)
        if path.stat().st_size > SCREENSHOT_BYTES:
            shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    assert path.stat().st_size < SCREENSHOT_BYTES, f"{path} is {path.stat().st_size} bytes"
    return path
