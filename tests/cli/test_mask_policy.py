"""One policy for unknown mask colours: training's dataset, `fcnseg eval` and `fcnseg predict --masks`
all refuse a colour outside the class list with the same message (file, colour, where, what to do)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.data import build_dataset
from fcnseg.errors import DataError
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]
MESSAGE = r"scene.png: colour \(1, 2, 3\) at row 5, column 7 is not a class colour .*repaint those pixels"


@pytest.fixture
def folder(tmp_path):
    """A folder dataset of one pair whose colour mask has one pixel in no class colour."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(f"classes: {CLASSES}\ncolors: {[list(c) for c in COLORS]}\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(
        root / "images" / "scene.png")
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, 24:] = COLORS[2]
    rgb[5, 7] = (1, 2, 3)
    Image.fromarray(rgb).save(root / "masks" / "scene.png")
    return root


@pytest.fixture
def checkpoint(tmp_path):
    model = fcn_resnet18(variant="8s", num_classes=len(CLASSES), weights_backbone=None)
    return save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS), tmp_path / "model.pt")


def test_training_dataset_refuses_the_unknown_colour(folder):
    dataset = build_dataset("folder", folder, "all")
    with pytest.raises(DataError, match=MESSAGE):
        dataset[0]


def test_eval_refuses_the_unknown_colour(folder, checkpoint, tmp_path, capsys):
    status = main(["eval", str(checkpoint), "--dataset", "folder", "--root", str(folder), "--split", "all",
                   "--out", str(tmp_path / "eval.json"), "--device", "cpu"])
    assert status == 1  # a bad data file found while evaluating: a failure at run time, not a usage error
    assert re.search(MESSAGE, capsys.readouterr().err)


def test_predict_with_masks_refuses_the_unknown_colour(folder, checkpoint, tmp_path, capsys):
    status = main(["predict", str(checkpoint), str(folder / "images"), "--masks", str(folder / "masks"),
                   "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert status == 1 and "0 ok, 1 failed" in captured.out
    assert re.search(MESSAGE, captured.out) and re.search(MESSAGE, captured.err)
