"""The serve page and the report in a real browser (headless Chromium): load, upload, wait, look.

The checks read what a user sees (the overlay's size, the legend's shares, the downloaded file's
bytes) and compare it with what `fcnseg predict` writes for the same photo; the browser's console
must stay free of errors.
"""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.inference.segmenter import Segmenter
from fcnseg.reporting.report import write_run_report
from fcnseg.serving.app import create_app
from fcnseg.serving.predictor import Predictor
from tests.browser.helpers import save_screenshot, then_wait, wait_for_state
from tests.reporting.helpers import tiny_run
from tests.serving.conftest import CLASSES, save_tiny_checkpoint
from tests.serving.helpers import ServerThread

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights: varied predictions, where sliding windows and flips change pixels."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "fcn8s.pt")


@pytest.fixture(scope="module")
def server(checkpoint, run_folder):
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", window=(32, 48))  # the checkpoint's crop
    with ServerThread(create_app(Predictor(segmenter), images=run_folder.parent / "tiny-data" / "images")) as url:
        yield url


@pytest.fixture(autouse=True)
def _fresh_console(browser):
    browser.get_log("browser")  # drops what earlier tests left in the console
    yield


def _console_errors(driver, allowed: str | None = None) -> list[str]:
    entries = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return [m for m in entries if not (allowed and re.search(allowed, m))]


def _fetch_bytes(driver, url: str) -> bytes:
    """The bytes behind a URL the page holds (a blob: URL), read inside the browser."""
    script = """const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {
          let s = ""; for (const v of new Uint8Array(b)) s += String.fromCharCode(v); done(btoa(s)); });"""
    return base64.b64decode(driver.execute_async_script(script, url))


def test_upload_a_photo_and_see_the_overlay(browser, server, checkpoint, run_folder, tmp_path, screenshot_dir):
    photo = run_folder.parent / "tiny-data" / "images" / "00004.png"
    assert main(["predict", str(checkpoint), str(photo), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress"]) == 0
    expected = (tmp_path / "out" / "00004.png").read_bytes()
    ids = np.asarray(Image.open(io.BytesIO(expected)))

    browser.get(server + "/")
    assert wait_for_state(browser, ("ready", "error")) == "ready"
    names = [e.text for e in browser.find_elements("css selector", "#legend td:nth-child(2)")]
    assert names == CLASSES

    assert then_wait(browser, lambda: browser.find_element("id", "file").send_keys(str(photo))) == "done", \
        browser.find_element("id", "error").text
    mask = browser.find_element("id", "mask")
    assert (int(mask.get_property("naturalHeight")), int(mask.get_property("naturalWidth"))) == ids.shape
    shares = {row.find_element("css selector", "td:nth-child(2)").text:
              row.find_element("css selector", "td:nth-child(3)").text
              for row in browser.find_elements("css selector", "#legend tr")}
    for k, name in enumerate(names):
        assert shares[name] == f"{100 * (ids == k).mean():.1f}%"
    link = browser.find_element("id", "download")
    assert link.get_attribute("download") == "00004_mask.png"
    assert _fetch_bytes(browser, link.get_attribute("href")) == expected  # the file a user downloads

    slider = browser.find_element("id", "opacity")
    browser.execute_script("arguments[0].value = 25; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert float(mask.value_of_css_property("opacity")) == pytest.approx(0.25)
    assert then_wait(browser, browser.find_element("id", "flip").click) == "done"  # predicts again, with flip
    assert _console_errors(browser) == []
    browser.execute_script("arguments[0].value = 60; arguments[0].dispatchEvent(new Event('input'))", slider)
    save_screenshot(browser, screenshot_dir / "serve.png")


def test_a_bad_upload_shows_its_message_and_the_page_goes_on(browser, server, tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("these are notes, not a photo")
    browser.get(server + "/")
    wait_for_state(browser, ("ready",))
    assert then_wait(browser, lambda: browser.find_element("id", "file").send_keys(str(fake))) == "error"
    assert "notes.jpg" in browser.find_element("id", "error").text
    # the page's own pick list: one of the server's images
    from selenium.webdriver.support.ui import Select

    pick = Select(browser.find_element("id", "gallery"))
    assert then_wait(browser, lambda: pick.select_by_visible_text("00000.png")) == "done"
    assert not browser.find_element("id", "error").is_displayed()
    # Chromium reports the refused request itself; nothing else may appear.
    assert _console_errors(browser, allowed=r"status of 400") == []


def test_the_report_opens_offline_with_every_figure(browser, run_folder, tmp_path, screenshot_dir):
    report = write_run_report(run_folder, tmp_path / "report.html", device="cpu")
    browser.get(report.path.resolve().as_uri())
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * (2 + 3 * len(report.images))
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
    assert fetched == []  # nothing requested beyond the file itself
    rows = browser.find_elements("css selector", ".image[data-miou]")
    assert len(rows) == len(report.images) and rows[0].text.startswith(f"1. {report.images[0].name}")
    assert _console_errors(browser) == []
    browser.set_window_size(1280, 1400)
    try:
        save_screenshot(browser, screenshot_dir / "report.png")
    finally:
        browser.set_window_size(1280, 860)


def test_drop_a_photo_then_switch_the_sliding_window_on(browser, server, checkpoint, run_folder, tmp_path):
    photo = run_folder.parent / "tiny-data" / "images" / "00009.png"
    for mode in ("whole", "sliding"):
        assert main(["predict", str(checkpoint), str(photo), "--out", str(tmp_path / mode), "--device", "cpu",
                     "--mode", mode, "--no-progress"]) == 0
    expected = {mode: (tmp_path / mode / "00009.png").read_bytes() for mode in ("whole", "sliding")}
    assert expected["whole"] != expected["sliding"]  # the switch matters for this photo
    browser.get(server + "/")
    wait_for_state(browser, ("ready",))
    drop = """const done = arguments[arguments.length - 1];
        fetch('/api/images/00009.png').then(r => r.blob()).then(blob => {
          const data = new DataTransfer();
          data.items.add(new File([blob], '00009.png', {type: 'image/png'}));
          document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
          done(true); });"""
    assert then_wait(browser, lambda: browser.execute_async_script(drop)) == "done"
    link = browser.find_element("id", "download")
    assert link.get_attribute("download") == "00009_mask.png"
    assert _fetch_bytes(browser, link.get_attribute("href")) == expected["whole"]
    assert then_wait(browser, browser.find_element("id", "sliding").click) == "done"
    assert _fetch_bytes(browser, link.get_attribute("href")) == expected["sliding"]
    assert _console_errors(browser) == []
