"""Makes docs/screenshots/serve.png and report.png with a real run, as the browser tests take theirs.

    python -m tests.browser.screenshots RUN_DIR PHOTO [--out docs/screenshots] [--images N]

RUN_DIR is a ``fcnseg train --out`` folder (its best.pt is served, its report opened); PHOTO is
uploaded through the page's file input, as a user would.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fcnseg.inference.segmenter import Segmenter
from fcnseg.reporting.report import write_run_report
from fcnseg.serving.app import create_app
from fcnseg.serving.predictor import Predictor
from tests.browser.helpers import WINDOW, save_screenshot, start_chromium, then_wait, wait_for_state
from tests.serving.helpers import ServerThread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("photo", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    driver = start_chromium()
    try:
        segmenter = Segmenter.from_checkpoint(args.run_dir / "best.pt", device="cpu")
        with ServerThread(create_app(Predictor(segmenter))) as url:
            driver.get(url + "/")
            wait_for_state(driver, ("ready",))
            state = then_wait(driver, lambda: driver.find_element("id", "file").send_keys(str(args.photo.resolve())))
            assert state == "done", driver.find_element("id", "error").text
            print(save_screenshot(driver, args.out / "serve.png"))
        with tempfile.TemporaryDirectory() as folder:
            report = write_run_report(args.run_dir, Path(folder) / "report.html", images=args.images, device="cpu")
            driver.set_window_size(WINDOW[0], 1100)
            driver.get(report.path.resolve().as_uri() + "#images")  # the images, worst first
            print(save_screenshot(driver, args.out / "report.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
