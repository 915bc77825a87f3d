"""`fcnseg eval`: whole-image metrics of a checkpoint, checked against a direct computation."""
from __future__ import annotations

import json

import numpy as np
import torch

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.data import build_dataset
from fcnseg.data.synthetic import make_synthetic
from fcnseg.data.transforms import eval_transforms
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint


def test_eval_json_matches_a_direct_confusion_matrix(tmp_path):
    root = make_synthetic(tmp_path / "data", num_classes=3, n=10, size=(40, 56), seed=1, progress=False)
    val = build_dataset("folder", root, "val")
    torch.manual_seed(0)
    model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None).eval()
    with torch.no_grad():
        model.score8.weight.normal_()  # a non-trivial prediction
    save_checkpoint(make_checkpoint(model, classes=val.classes, colors=val.colors), tmp_path / "model.pt")

    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "model.pt"), "--dataset", "folder", "--root", str(root),
                 "--split", "val", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".confusion.png").exists()

    normalized = build_dataset("folder", root, "val", transforms=eval_transforms())
    cm = np.zeros((3, 3), dtype=np.int64)
    for i in range(len(normalized)):
        image, target = normalized[i]
        with torch.no_grad():
            pred = model(image[None])[0].argmax(0).numpy()
        t = target.numpy()
        keep = t != 255
        np.add.at(cm, (t[keep], pred[keep]), 1)
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert report["num_images"] == len(val) and report["num_pixels"] == cm.sum()
    assert abs(report["pixel_acc"] - np.diag(cm).sum() / cm.sum()) < 1e-9
    assert abs(report["miou"] - np.nanmean(iou)) < 1e-9
    assert set(report["per_class_iou"]) == set(val.classes)
    for key in ("mean_acc", "fwiou"):
        assert 0.0 <= report[key] <= 1.0


def test_eval_refuses_a_checkpoint_of_other_classes(tmp_path, capsys):
    root = make_synthetic(tmp_path / "data", num_classes=3, n=5, size=(40, 56), seed=1, progress=False)
    model = fcn_resnet18(num_classes=5, weights_backbone=None)
    save_checkpoint(make_checkpoint(model, classes=list("abcde"), colors=[(i, i, i) for i in range(5)]), tmp_path / "m.pt")
    assert main(["eval", str(tmp_path / "m.pt"), "--dataset", "folder", "--root", str(root), "--device", "cpu",
                 "--out", str(tmp_path / "e.json")]) == 2
    assert "classes" in capsys.readouterr().err
