"""Evaluation: `evaluate`'s confusion matrix and loss against a hand computation with void pixels;
`evaluate_checkpoint` on a tiny synthetic dataset against predicting image by image; `write_report`."""
from __future__ import annotations

import inspect
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fcnseg.constants import MAX_IMAGE_PIXELS_ENV
from fcnseg.data.synthetic import make_synthetic, synthetic_classes
from fcnseg.errors import DataError
from fcnseg.evaluation import EvaluationReport, evaluate, evaluate_checkpoint, write_report
from fcnseg.metrics import ConfusionMatrix
from fcnseg.models import build_model, inference_form
from fcnseg.models.checkpoint import make_checkpoint, model_from_checkpoint, save_checkpoint
from tests.conftest import random_scores_checkpoint
from tests.data.helpers import header_only_png

VOID = 255
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


class Scaled(nn.Module):
    """Logits = 2 * image: predictions are the argmax of the input's channels, known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, image):
        return image * self.scale


def _hand_confusion_and_loss(batches, num_classes):
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    losses = []
    for image, target in batches:
        logits = 2 * image.double().numpy()
        for n, y, x in np.ndindex(target.shape):
            t = int(target[n, y, x])
            if t == VOID:
                continue
            z = logits[n, :, y, x]
            matrix[t, int(z.argmax())] += 1
            losses.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[t])
    return matrix, float(np.mean(losses))


def _toy_batches():
    gen = torch.Generator().manual_seed(0)
    batches = []
    for n, h, w in [(2, 5, 6), (1, 7, 3), (3, 4, 4)]:
        image = torch.randn(n, 3, h, w, generator=gen)
        target = torch.randint(0, 3, (n, h, w), generator=gen)
        target[torch.rand(n, h, w, generator=gen) < 0.3] = VOID
        batches.append((image, target))
    all_void = (torch.randn(1, 3, 2, 2, generator=gen), torch.full((1, 2, 2), VOID))  # adds nothing
    return batches + [all_void]


def test_evaluate_matches_a_hand_computation_with_void_pixels():
    batches = _toy_batches()
    model = Scaled().train()
    metrics, matrix, loss = evaluate(model, batches, 3, device=CPU)
    expected_matrix, expected_loss = _hand_confusion_and_loss(batches, 3)
    np.testing.assert_array_equal(matrix.matrix.cpu().numpy(), expected_matrix)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert model.training  # put back in the mode it came in

    total = expected_matrix.sum()
    assert metrics.num_pixels == total
    assert metrics.pixel_acc == pytest.approx(np.trace(expected_matrix) / total)
    diag = np.diag(expected_matrix)
    iou = diag / (expected_matrix.sum(0) + expected_matrix.sum(1) - diag)
    assert metrics.miou == pytest.approx(iou.mean())
    assert metrics.mean_acc == pytest.approx((diag / expected_matrix.sum(1)).mean())


def test_evaluate_uses_predict_and_reports_absent_classes():
    batches = _toy_batches()
    calls = []

    def predict(model, image):
        # the channels permuted, and a 4th class that is never predicted (nor in the truth)
        calls.append(image.shape)
        logits = model(image)[:, [2, 0, 1]]
        return torch.cat([logits, torch.full_like(logits[:, :1], -1e9)], 1)

    metrics, matrix, loss = evaluate(Scaled(), batches, 4, device=CPU, predict=predict)
    assert calls == [image.shape for image, _ in batches]
    expected_matrix, expected_loss = _hand_confusion_and_loss([(x[:, [2, 0, 1]], t) for x, t in batches], 3)
    np.testing.assert_array_equal(matrix.matrix.cpu().numpy()[:3, :3], expected_matrix)
    assert matrix.matrix[3].sum() == 0 and matrix.matrix[:, 3].sum() == 0
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert metrics.absent_classes == [3] and metrics.per_class_iou[3] is None


# --- evaluate_checkpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("scenes") / "data", num_classes=3, n=7, size=(40, 56), seed=0,
                          progress=False)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    return random_scores_checkpoint(tmp_path_factory.mktemp("ck") / "model.pt", mean=(0.5, 0.4, 0.45),
                                    std=(0.25, 0.2, 0.3))


def _by_hand(checkpoint_path, root, split, limit=None):
    """Reads the files named in the split list with PIL, normalises by hand, predicts one image at a time."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    model = inference_form(model_from_checkpoint(checkpoint))
    mean, std = np.array(checkpoint["mean"]), np.array(checkpoint["std"])
    matrix = np.zeros((3, 3), dtype=np.int64)
    losses = []
    pairs = [line.split() for line in (root / f"{split}.txt").read_text().splitlines() if line.strip()]
    for stem, *_ in pairs[:limit]:
        image = np.asarray(Image.open(root / "images" / f"{stem}.png").convert("RGB"), dtype=np.float64) / 255
        mask = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
        x = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1)[None]).float()
        with torch.no_grad():
            logits = model(x)[0].double().numpy()
        pred = logits.argmax(0)
        keep = mask != VOID
        np.add.at(matrix, (mask[keep].astype(np.int64), pred[keep]), 1)
        z = logits[:, keep]
        top = z.max(0)
        losses.append(np.log(np.exp(z - top).sum(0)) + top - z[mask[keep], np.arange(keep.sum())])
    return len(pairs[:limit]), matrix, float(np.concatenate(losses).mean())


@pytest.mark.parametrize("split,batch_size,limit", [("train", 2, None), ("val", 4, None), ("train", 3, 4)])
def test_evaluate_checkpoint_equals_predicting_by_hand(scenes, checkpoint_path, split, batch_size, limit):
    # amp="none": compared with float32 logits by hand, to the pixel (the default "auto" is bf16 on CPUs with native bf16).
    report = evaluate_checkpoint(checkpoint_path, "folder", scenes, split, batch_size=batch_size, max_images=limit,
                                 amp="none")
    count, matrix, loss = _by_hand(checkpoint_path, scenes, split, limit)
    assert report.num_images == count
    assert report.classes == synthetic_classes(3) and report.mode == "whole" and not report.flip
    np.testing.assert_array_equal(report.confusion.matrix.cpu().numpy(), matrix)
    assert report.val_loss == pytest.approx(loss, rel=1e-4)
    assert report.metrics.pixel_acc == pytest.approx(np.trace(matrix) / matrix.sum())
    assert (matrix.sum(0) > 0).sum() >= 2  # the random model does not predict one class everywhere


def test_sliding_with_one_window_equals_whole(scenes, checkpoint_path):
    whole = evaluate_checkpoint(checkpoint_path, "folder", scenes, "train")
    sliding = evaluate_checkpoint(checkpoint_path, "folder", scenes, "train", mode="sliding", window=(40, 56))
    assert sliding.mode == "sliding"
    np.testing.assert_array_equal(sliding.confusion.matrix.numpy(), whole.confusion.matrix.numpy())


def test_amp_auto_is_the_default_as_for_segmenter():
    assert inspect.signature(evaluate_checkpoint).parameters["amp"].default == "auto"


def test_an_image_above_the_pixel_cap_in_the_split_is_a_data_error(scenes, checkpoint_path, tmp_path, monkeypatch):
    """A PNG whose header declares 10^10 pixels: refused, with the file named, before any prediction."""
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "")  # empty: the default; and restored afterwards, unlike delenv of an unset name
    root = shutil.copytree(scenes, tmp_path / "data")
    header_only_png(root / "images" / "huge.png", 100_000, 100_000)
    Image.new("L", (56, 40)).save(root / "masks" / "huge.png")
    first = (root / "train.txt").read_text().split()[0]
    (root / "bomb.txt").write_text(f"{first}\nhuge\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DataError, match=r"huge.png: the image is 10,000,000,000 pixels, above the cap"):
            evaluate_checkpoint(checkpoint_path, "folder", root, "bomb")


# --- write_report ----------------------------------------------------------------------------------


def test_write_report_writes_json_and_a_confusion_png(tmp_path):
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 1, VOID]]))
    report = EvaluationReport(matrix.compute(), matrix, ["a", "b", "c"], num_images=1, val_loss=0.5, mode="whole",
                              seconds=1.234)
    path = write_report(report, tmp_path / "out" / "report.json")
    assert path == tmp_path / "out" / "report.json"
    data = json.loads(path.read_text())
    assert data["pixel_acc"] == pytest.approx(2 / 3)
    assert data["per_class_iou"] == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert (data["num_images"], data["val_loss"], data["mode"], data["flip"], data["seconds"]) == (1, 0.5, "whole",
                                                                                                 False, 1.23)
    png = tmp_path / "out" / "report.confusion.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 50


# -- the border policy of the checkpoint's training run ---------------------------------------------

def _voc_with_border(root):
    """One 24x32 VOC val pair: row 0 the void border, rows 1-11 background, rows 12-23 class 5."""
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "JPEGImages").mkdir()
    (base / "SegmentationClass").mkdir()
    Image.fromarray(np.full((24, 32, 3), 90, dtype=np.uint8)).save(base / "JPEGImages" / "a.jpg")
    ids = np.zeros((24, 32), dtype=np.uint8)
    ids[12:] = 5
    ids[0] = VOID
    mask = Image.fromarray(ids, "P")
    mask.putpalette([0] * 768)
    mask.save(base / "SegmentationClass" / "a.png")
    for split in ("train", "val", "trainval"):
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("a\n")
    return root


def _background_checkpoint(path, border_as_background: bool | None):
    """An FCN that predicts background everywhere, saved with a training config reading the border so."""
    from fcnseg.data.voc import VOC_CLASSES, VOC_COLORMAP

    model = build_model("fcn_resnet18", num_classes=21, weights_backbone=None)
    with torch.no_grad():
        model.score32.weight.zero_()
        model.score32.bias.zero_()
        model.score32.bias[0] = 10.0  # the bilinear upsampler spreads it with positive weights everywhere
    config = None if border_as_background is None else {"dataset": "voc2012", "border_as_background": border_as_background}
    return save_checkpoint(make_checkpoint(model, classes=VOC_CLASSES, colors=VOC_COLORMAP, config=config), path)


@pytest.mark.parametrize("trained, expected_acc, said", [
    (True, 12 / 24, "border read as background, as in training"),  # 32 border + 11 * 32 background of 24 * 32
    (False, 11 / 23, "border void (ignored), as in training"),  # 11 of the 23 labelled rows
    (None, 11 / 23, "border void (ignored), as in training"),  # no config: fcnseg's default reading
])
def test_evaluate_checkpoint_reads_the_border_as_its_training_run(tmp_path, trained, expected_acc, said):
    root = _voc_with_border(tmp_path / "voc")
    checkpoint = _background_checkpoint(tmp_path / "m.pt", trained)
    report = evaluate_checkpoint(checkpoint, "voc2012", root, "val", device="cpu", amp="none", progress=False)
    assert report.metrics.pixel_acc == pytest.approx(expected_acc)
    assert report.border == said and report.as_dict()["border"] == said
    other = evaluate_checkpoint(checkpoint, "voc2012", root, "val", device="cpu", amp="none", progress=False,
                                border_as_background=not trained)  # told otherwise: the other figure, said so
    assert other.metrics.pixel_acc == pytest.approx(11 / 23 if trained else 12 / 24)
    assert other.border == ("border void (ignored)" if trained else "border read as background")
