"""`fcnseg eval`: whole-image metrics of a checkpoint, checked against a direct computation."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.data import build_dataset
from fcnseg.data.synthetic import make_synthetic
from fcnseg.data.transforms import eval_transforms
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint


def direct_logits(model, image: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """Logits of one (3, H, W) image averaged over resized copies, resized back: multi-scale by hand."""
    height, width = image.shape[-2:]
    total = torch.zeros(())
    for scale in scales:
        size = (round(height * scale), round(width * scale))
        resized = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        logits = model(resized)
        total = total + torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                        align_corners=False)
    return total[0] / len(scales)


@pytest.mark.parametrize("scales", [(), (0.5, 1.0, 1.5)])
def test_eval_json_matches_a_direct_confusion_matrix(tmp_path, scales):
    root = make_synthetic(tmp_path / "data", num_classes=3, n=10, size=(40, 56), seed=1, progress=False)
    val = build_dataset("folder", root, "val")
    torch.manual_seed(0)
    model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None).eval()
    with torch.no_grad():
        model.score8.weight.normal_()  # a non-trivial prediction
    save_checkpoint(make_checkpoint(model, classes=val.classes, colors=val.colors), tmp_path / "model.pt")

    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "model.pt"), "--dataset", "folder", "--root", str(root),
                 "--split", "val", "--out", str(out), "--device", "cpu", "--amp", "none",  # exact: fp32
                 *(["--scales", *map(str, scales)] if scales else [])]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".confusion.png").exists()

    normalized = build_dataset("folder", root, "val", transforms=eval_transforms())
    cm = np.zeros((3, 3), dtype=np.int64)
    for i in range(len(normalized)):
        image, target = normalized[i]
        with torch.no_grad():
            pred = direct_logits(model, image, scales or (1.0,)).argmax(0).numpy()
        t = target.numpy()
        keep = t != 255
        np.add.at(cm, (t[keep], pred[keep]), 1)
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert report["num_images"] == len(val) and report["num_pixels"] == cm.sum()
    assert abs(report["pixel_acc"] - np.diag(cm).sum() / cm.sum()) < 1e-9
    assert abs(report["miou"] - np.nanmean(iou)) < 1e-9
    assert set(report["per_class_iou"]) == set(val.classes) and report["scales"] == list(scales or (1.0,))
    for key in ("mean_acc", "fwiou"):
        assert 0.0 <= report[key] <= 1.0


def test_eval_refuses_a_checkpoint_of_other_classes(tmp_path, capsys):
    root = make_synthetic(tmp_path / "data", num_classes=3, n=5, size=(40, 56), seed=1, progress=False)
    model = fcn_resnet18(num_classes=5, weights_backbone=None)
    save_checkpoint(make_checkpoint(model, classes=list("abcde"), colors=[(i, i, i) for i in range(5)]), tmp_path / "m.pt")
    # A checkpoint of other classes than the dataset given: what was typed is wrong, a usage error (2).
    assert main(["eval", str(tmp_path / "m.pt"), "--dataset", "folder", "--root", str(root), "--device", "cpu",
                 "--out", str(tmp_path / "e.json")]) == 2
    assert "classes" in capsys.readouterr().err


# Every mistake on the command line is a usage error (exit status 2) answered before the metrics are
# computed; dataset and root default to those the checkpoint was trained on.

def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels in its header and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture
def data_and_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A 5-scene folder dataset (val: one scene) and a checkpoint whose training config names it."""
    root = make_synthetic(tmp_path / "data", num_classes=3, n=5, size=(32, 48), seed=1, progress=False)
    classes = build_dataset("folder", root, "val").classes
    model = fcn_resnet18(num_classes=3, weights_backbone=None)
    checkpoint = make_checkpoint(model, classes=classes, colors=[(0, 0, 0), (9, 9, 9), (99, 99, 99)],
                                 config={"dataset": "folder", "root": str(root), "crop": [32, 32]})
    return root, save_checkpoint(checkpoint, tmp_path / "model.pt")


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fails a test that reaches the metrics: every check must come before them."""
    import fcnseg.evaluation

    def refuse(*args, **kwargs):
        raise AssertionError("the metrics were computed before the command line was checked")

    monkeypatch.setattr(fcnseg.evaluation, "evaluate_checkpoint", refuse)


def test_dataset_and_root_come_from_the_checkpoint(data_and_checkpoint, tmp_path, capsys):
    root, checkpoint = data_and_checkpoint
    out = tmp_path / "e.json"
    assert main(["eval", str(checkpoint), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"dataset and root from the checkpoint's training config: --dataset folder --root {root}" in captured.out
    assert json.loads(out.read_text())["num_images"] == 1
    assert "eval val" not in captured.err  # --no-progress: no progress output


def test_a_model_folder_evaluates_as_its_checkpoint(data_and_checkpoint, tmp_path):
    root, checkpoint = data_and_checkpoint
    folder = tmp_path / "model-folder"
    assert main(["export", str(checkpoint), "--format", "hf", "--out", str(folder)]) == 0
    reports = []
    for source, name in ((checkpoint, "a.json"), (folder, "b.json")):
        assert main(["eval", str(source), "--dataset", "folder", "--root", str(root), "--out", str(tmp_path / name),
                     "--device", "cpu", "--amp", "none", "--no-progress"]) == 0
        reports.append(json.loads((tmp_path / name).read_text()))
    for key in ("miou", "pixel_acc", "num_pixels", "per_class_iou"):
        assert reports[0][key] == reports[1][key]
    assert main(["eval", str(tmp_path), "--out", str(tmp_path / "c.json")]) == 2  # a folder, not a model folder


def test_a_checkpoint_without_a_dataset_asks_for_one(tmp_path, no_evaluation, capsys):
    model = fcn_resnet18(num_classes=3, weights_backbone=None)
    save_checkpoint(make_checkpoint(model, classes=list("abc"), colors=[(0, 0, 0)] * 3), tmp_path / "m.pt")
    assert main(["eval", str(tmp_path / "m.pt"), "--out", str(tmp_path / "e.json")]) == 2
    assert "the checkpoint records no dataset to evaluate on; pass --dataset and --root" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m.pt"), "--dataset", "folder", "--out", str(tmp_path / "e.json")]) == 2
    assert "pass --root" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    (["--out", "{tmp}"], "is a folder; give a file name"),
    (["--out", "{tmp}/model.pt/e.json"], "model.pt is a file, not a folder"),
    (["--root", "{tmp}/nowhere"], "--root {tmp}/nowhere: no such folder"),
    (["--mode", "sliding", "--window", "32x32", "--stride", "40x16"], "stride 40x16 is larger than the window 32x32"),
    (["--mode", "sliding", "--stride", "48x48"], "stride 48x48 is larger than the window 32x32"),  # the training crop
    (["--holdout", "0.2"], "pass --split train (got --split val)"),
    (["--split", "train", "--holdout", "1"], "--holdout must be a fraction of the split, 0 < F < 1, got 1"),
    (["--split", "train", "--holdout-groups", "^0"], "--holdout-groups chooses which images --holdout F holds out"),
    (["--split", "train", "--holdout", "0.5", "--holdout-groups", "("], "--holdout-groups '(' is not a regular"),
])
def test_mistakes_are_refused_before_the_metrics(arguments, message, data_and_checkpoint, tmp_path, no_evaluation,
                                                  capsys):
    _, checkpoint = data_and_checkpoint
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "e.json")]
    assert main(["eval", str(checkpoint), "--device", "cpu", *arguments]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_usage_error(data_and_checkpoint, tmp_path, no_evaluation, capsys):
    _, checkpoint = data_and_checkpoint
    assert main(["eval", str(checkpoint), "--device", "cuda", "--out", str(tmp_path / "e.json")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_batch_size_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", "model.pt", "--batch-size", value])
    assert exited.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def test_a_png_declaring_ten_gigapixels_is_refused_by_name(data_and_checkpoint, tmp_path, capsys):
    root, checkpoint = data_and_checkpoint
    (root / "images" / "00004.png").write_bytes(_png_header(100_000, 100_000))  # the val scene
    status = main(["eval", str(checkpoint), "--out", str(tmp_path / "e.json"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1  # a bad data file, found at run time
    assert "00004.png: the image is" in err and "10,000,000,000 pixels, above the cap" in err
    assert "--max-pixels" in err and "Traceback" not in err


def test_max_pixels_sets_the_cap_for_the_command_only(data_and_checkpoint, tmp_path, capsys):
    from fcnseg.constants import MAX_IMAGE_PIXELS_ENV

    before = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    _, checkpoint = data_and_checkpoint
    assert main(["eval", str(checkpoint), "--out", str(tmp_path / "e.json"), "--device", "cpu", "--no-progress",
                 "--max-pixels", "1000"]) == 1  # the 32x48 scenes are above a cap of 1000 pixels
    assert "above the cap of 1,000 pixels" in capsys.readouterr().err
    assert os.environ.get(MAX_IMAGE_PIXELS_ENV) == before


def test_eval_applies_the_border_policy_of_training_and_says_so(tmp_path, capsys):
    # A d2l-recipe checkpoint (border read as background in training): eval reports the number its run did.
    from tests.test_evaluation import _background_checkpoint, _voc_with_border

    root = _voc_with_border(tmp_path / "voc")
    checkpoint = _background_checkpoint(tmp_path / "m.pt", True)
    out = tmp_path / "e.json"
    common = [str(checkpoint), "--dataset", "voc2012", "--root", str(root), "--device", "cpu", "--amp", "none",
              "--no-progress"]
    assert main(["eval", *common, "--out", str(out)]) == 0
    assert "1 images, whole mode; border read as background, as in training" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["pixel_acc"] == pytest.approx(12 / 24) and report["border"] == "border read as background, as in training"
    assert main(["eval", *common, "--no-border-as-background", "--out", str(tmp_path / "v.json")]) == 0
    assert "border void (ignored)" in capsys.readouterr().out
    assert json.loads((tmp_path / "v.json").read_text())["pixel_acc"] == pytest.approx(11 / 23)


def test_eval_holdout_scores_the_images_a_holdout_run_validated_on(tmp_path, capsys):
    from fcnseg.data.splits import holdout_split

    root = make_synthetic(tmp_path / "data", num_classes=3, n=10, size=(40, 56), seed=1, progress=False)
    (root / "val.txt").write_text("no_such_image\n")  # neither command may read the val split
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(root), "--model", "fcn_resnet18", "--weights-backbone",
                 "none", "--holdout", "0.4", "--iterations", "1", "--batch-size", "2", "--crop", "32x32",
                 "--amp", "none", "--channels-last", "false", "--workers", "0", "--no-progress",
                 "--out", str(run)]) == 0
    out = tmp_path / "holdout.json"
    assert main(["eval", str(run / "last.pt"), "--split", "train", "--holdout", "0.4", "--amp", "none",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    report, trained = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    held = holdout_split(len(build_dataset("folder", root, "train")), 0.4)[1]
    assert report["num_images"] == len(held) and report["holdout"] == 0.4
    assert f"{len(held)} images held out of train (0.4)" in capsys.readouterr().out
    # The training run's final validation was on the same held-out images, predicted the same way.
    assert report["miou"] == pytest.approx(trained["miou"], abs=1e-9)
    assert report["per_class_iou"] == pytest.approx(trained["per_class_iou"], abs=1e-9, nan_ok=True)


def test_eval_holdout_lists_the_split_as_a_drop_small_run_did(tmp_path, capsys):
    from PIL import Image

    from fcnseg.data.splits import holdout_split

    root = make_synthetic(tmp_path / "data", num_classes=3, n=10, size=(40, 56), seed=1, progress=False)
    stems = (root / "train.txt").read_text().split()
    for stem in stems[1:7:2]:  # three images smaller than the crop, among the first of the split
        for folder, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
            path = root / folder / f"{stem}.png"
            Image.open(path).resize((24, 24), resample).save(path)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(root), "--model", "fcn_resnet18", "--weights-backbone",
                 "none", "--holdout", "0.4", "--drop-small", "--iterations", "1", "--batch-size", "2",
                 "--crop", "32x32", "--amp", "none", "--channels-last", "false", "--workers", "0", "--no-progress",
                 "--out", str(run)]) == 0
    out = tmp_path / "holdout.json"
    assert main(["eval", str(run / "last.pt"), "--split", "train", "--holdout", "0.4", "--amp", "none",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    report, trained = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    listed = build_dataset("folder", root, "train", drop_smaller_than=(32, 32))
    assert len(listed) == len(stems) - 3 and report["num_images"] == len(holdout_split(len(listed), 0.4)[1])
    assert report["miou"] == pytest.approx(trained["miou"], abs=1e-9)
    assert report["per_class_iou"] == pytest.approx(trained["per_class_iou"], abs=1e-9, nan_ok=True)


def sequences(root: Path) -> Path:
    """The folder dataset at ``root`` with its images renamed into two "sequences", A_ and B_ (4 and 6 images)."""
    stems = sorted(p.stem for p in (root / "images").glob("*.png"))
    renamed = {stem: f"{'A' if i < 4 else 'B'}_{stem}" for i, stem in enumerate(stems)}
    for folder in ("images", "masks"):
        for stem, name in renamed.items():
            (root / folder / f"{stem}.png").rename(root / folder / f"{name}.png")
    (root / "train.txt").write_text("".join(f"{name}\n" for name in renamed.values()))
    (root / "val.txt").unlink()
    return root


def test_eval_holdout_takes_the_groups_the_run_held_out(tmp_path, capsys):
    root = sequences(make_synthetic(tmp_path / "data", num_classes=3, n=10, size=(40, 56), seed=1, progress=False))
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(root), "--model", "fcn_resnet18", "--weights-backbone",
                 "none", "--holdout", "0.3", "--holdout-groups", "^[^_]+", "--iterations", "1", "--batch-size", "2",
                 "--crop", "32x32", "--amp", "none", "--channels-last", "false", "--workers", "0", "--no-progress",
                 "--out", str(run)]) == 0
    assert "validating on 4 images held out of the training split (0.3, whole groups" in capsys.readouterr().out
    out = tmp_path / "holdout.json"
    assert main(["eval", str(run / "last.pt"), "--split", "train", "--holdout", "0.3", "--amp", "none",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    report, trained = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    assert report["num_images"] == 4 and report["holdout_groups"] == "^[^_]+"  # sequence A, the closest to 3 of 10
    printed = capsys.readouterr().out
    assert "holdout groups from the checkpoint's training config: --holdout-groups '^[^_]+'" in printed
    assert "4 images held out of train (0.3, whole groups of '^[^_]+')" in printed
    assert report["miou"] == pytest.approx(trained["miou"], abs=1e-9)


def test_a_scale_of_zero_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "m.pt", "--scales", "1", "0"])
    assert exit_info.value.code == 2
    assert "argument --scales: expected a number > 0, got 0" in capsys.readouterr().err
