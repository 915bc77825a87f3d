"""`write_run_report` on a real (tiny) run: its numbers against a computation by hand, the page self-contained."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from fcnseg.data.io import read_mask
from fcnseg.errors import DataError, UsageError
from fcnseg.evaluation import evaluate_checkpoint
from fcnseg.inference.segmenter import Segmenter
from fcnseg.reporting.report import write_run_report

pytestmark = pytest.mark.usefixtures("one_thread")


def _miou(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean IoU over the classes in the (labelled) truth or the prediction there, by hand."""
    labelled = target != 255
    ious = []
    for k in range(num_classes):
        truth, guess = (target == k) & labelled, (pred == k) & labelled
        union = (truth | guess).sum()
        if union:
            ious.append((truth & guess).sum() / union)
    return float(np.mean(ious)) if ious else float("nan")


@pytest.fixture(scope="module")
def report(run_folder, tmp_path_factory):
    return write_run_report(run_folder, tmp_path_factory.mktemp("report") / "report.html", images=0,
                            device="cpu", amp="none")


def test_numbers_match_a_computation_by_hand(report, run_folder):
    root = run_folder.parent / "tiny-data"
    names = (root / "val.txt").read_text().split()
    assert report.total_images == len(report.images) == len(names) == 4
    segmenter = Segmenter.from_checkpoint(run_folder / "best.pt", device="cpu", amp="none")
    confusion = np.zeros((3, 3), np.int64)
    by_name = {}
    for name in names:
        pred = segmenter.predict(root / "images" / f"{name}.png")
        target = read_mask(root / "masks" / f"{name}.png", num_classes=3).numpy()
        by_name[f"{name}.png"] = _miou(pred, target, 3)
        keep = target != 255
        np.add.at(confusion, (target[keep], pred[keep]), 1)
    for result in report.images:
        assert result.metrics.miou == pytest.approx(by_name[result.name], abs=1e-12)
    np.testing.assert_array_equal(report.confusion.numpy(), confusion)
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert report.metrics.miou == pytest.approx(float(np.nanmean(iou)), abs=1e-12)
    mious = [r.metrics.miou for r in report.images]
    assert mious == sorted(mious)  # worst first


def test_the_batched_evaluation_agrees(report, run_folder):
    evaluated = evaluate_checkpoint(run_folder / "best.pt", "folder", run_folder.parent / "tiny-data", "val",
                                    device="cpu", amp="none", progress=False)
    assert evaluated.num_images == len(report.images)
    assert evaluated.metrics.num_pixels == report.metrics.num_pixels
    assert evaluated.metrics.miou == pytest.approx(report.metrics.miou, abs=1e-3)


def test_the_page_is_self_contained(report, run_folder):
    page = report.path.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=\s*\"(?!data:)", page)  # every picture embedded, no link out
    assert "<script" not in page and "http://" not in page and "https://" not in page
    sources = re.findall(r"src=\"data:image/(png|jpeg);base64,([^\"]+)\"", page)
    assert len(sources) == 2 + 3 * len(report.images)  # curves, confusion, three per image
    for kind, data in sources:
        with Image.open(io.BytesIO(base64.b64decode(data))) as picture:
            assert picture.format == kind.upper() and min(picture.size) > 0
    shown = [float(v) for v in re.findall(r"data-miou=\"([0-9.]+)\"", page)]
    assert shown == sorted(shown) and len(shown) == len(report.images)
    final = json.loads((run_folder / "metrics.json").read_text())
    assert f"mIoU {final['miou']:.4f}" in page  # the run's own last validation
    for heading in ("Training curves", "Per-class IoU", "Confusion matrix", "Images, worst first"):
        assert heading in page


def test_first_images_only_and_no_curves_without_a_history(run_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("best.pt", "config.yaml"):
        shutil.copy(run_folder / name, bare / name)
    report = write_run_report(bare, images=2, device="cpu", root=run_folder.parent / "tiny-data")
    page = report.path.read_text(encoding="utf-8")
    assert report.path == bare / "report.html" and len(report.images) == 2 and report.total_images == 4
    assert "no curves" in page and page.count("data:image/") == 1 + 3 * 2
    assert {r.index for r in report.images} == {0, 1}


def test_refusals(run_folder, tmp_path):
    with pytest.raises(UsageError, match="not a run folder"):
        write_run_report(tmp_path)
    moved = tmp_path / "run"
    shutil.copytree(run_folder, moved, ignore=shutil.ignore_patterns("tensorboard"))
    config = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(re.sub(r"(?m)^root: .*$", "root: /no/such/data", config))
    with pytest.raises(UsageError, match="give it with --root"):
        write_run_report(moved)
    with pytest.raises(DataError, match="no nosuchsplit.txt"):
        write_run_report(moved, root=run_folder.parent / "tiny-data", split="nosuchsplit")
