"""`fcnseg export --format hf`: the model folder, its card, and the folder accepted where a checkpoint is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = fcn_resnet18(variant="32s", num_classes=2, weights_backbone=None)
    metrics = {"pixel_acc": 0.91234, "mean_acc": 0.8, "miou": 0.65432, "fwiou": 0.85,
               "per_class_iou": {"sky": 0.7, "sea": 0.6}}
    config = {"dataset": "folder", "root": "data/coast", "crop": [32, 48], "lr": 0.01, "epochs": 3}
    return save_checkpoint(make_checkpoint(model, classes=["sky", "sea"], colors=[(0, 0, 255), (0, 128, 0)],
                                           config=config, metrics=metrics), tmp_path_factory.mktemp("ck") / "coast.pt")


def test_export_writes_a_model_folder_that_predict_accepts(checkpoint, tmp_path, capsys):
    out = tmp_path / "coast-fcn"
    assert main(["export", str(checkpoint), "--format", "hf", "--out", str(out), "--license", "cc-by-4.0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "cc-by-4.0" and front["library_name"] == "fcnseg"
    assert "| mean IoU | 0.6543 |" in card and "| sky | 0.7000 |" in card
    assert "fcnseg train --config config.yaml" in card and "lr: 0.01" in card and "root `data/coast`" in card

    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(photo)
    for source, target in ((checkpoint, "a"), (out, "b")):
        assert main(["predict", str(source), str(photo), "--out", str(tmp_path / target), "--device", "cpu",
                     "--no-progress", "--mode", "sliding"]) == 0  # the window: the training crop, from either
    assert (tmp_path / "a" / "p.png").read_bytes() == (tmp_path / "b" / "p.png").read_bytes()
    # the folder exports on, as a checkpoint would
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_bad_folders_are_usage_errors(checkpoint, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(checkpoint), "--format", "hf", "--out", str(busy)]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), str(checkpoint), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a folder but not a model folder: it has no config.json and no model.safetensors" in err
    assert "Traceback" not in err
