"""`fcnseg predict`: outputs per image, bad inputs reported and skipped, exit status."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.inference.segmenter import Segmenter
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None)
    return save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS),
                           tmp_path_factory.mktemp("ck") / "fcn8s.pt")


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(folder / "street.jpg")
    Image.fromarray(rng.integers(0, 256, (67, 93), dtype=np.uint8)).save(folder / "gray.png")  # mode L
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (folder / "notes.txt").write_text("not an image, and not an image extension: ignored")
    return folder


def _run(*argv: str) -> int:
    return main(["predict", *map(str, argv), "--no-progress"])


def test_folder_with_a_corrupt_file(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "out"
    status = _run(checkpoint, photos, "--out", out)
    captured = capsys.readouterr()
    assert status == 1
    assert "2 ok, 1 failed" in captured.out
    assert "broken.jpg" in captured.out and "broken.jpg" in captured.err  # in the summary and when it happened
    assert sorted(p.name for p in out.iterdir()) == ["gray.png", "gray_overlay.png", "manifest.jsonl", "street.png",
                                                     "street_overlay.png"]

    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    for stem, ext in (("street", ".jpg"), ("gray", ".png")):
        with Image.open(out / f"{stem}.png") as mask:
            assert mask.mode == "P"
            np.testing.assert_array_equal(np.asarray(mask), segmenter.predict(photos / f"{stem}{ext}"))
            assert np.asarray(mask.getpalette()[:9]).reshape(3, 3).tolist() == [list(c) for c in COLORS]
        with Image.open(out / f"{stem}_overlay.png") as overlay_png:
            assert overlay_png.mode == "RGB" and overlay_png.size == Image.open(photos / f"{stem}{ext}").size


def test_all_good_inputs_exit_zero_with_grids_and_ground_truth(checkpoint, photos, tmp_path, capsys):
    (photos / "broken.jpg").unlink()
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((64, 96), np.uint8), mode="L").save(masks / "street.png")
    out = tmp_path / "out"
    assert _run(checkpoint, photos / "street.jpg", photos / "gray.png", "--out", out, "--grid", "--masks", masks) == 0
    assert "2 ok, 0 failed" in capsys.readouterr().out
    for stem in ("street", "gray"):
        with Image.open(out / f"{stem}_grid.png") as grid:
            assert grid.size[0] > 300
    # with ground truth the figure has a third column
    assert Image.open(out / "street_grid.png").size[0] > Image.open(out / "gray_grid.png").size[0]


def test_missing_paths_and_empty_globs_are_failures(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "out"
    status = _run(checkpoint, photos / "street.jpg", tmp_path / "nowhere.jpg", tmp_path / "*.none", "--out", out)
    captured = capsys.readouterr()
    assert status == 1
    assert "1 ok, 2 failed" in captured.out and "nowhere.jpg" in captured.out and "*.none" in captured.out
    assert (out / "street.png").is_file()


def test_glob_sliding_flip(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "out"
    status = _run(checkpoint, photos / "*.png", "--out", out, "--mode", "sliding", "--window", "32x48",
                  "--stride", "20x30", "--flip")
    assert status == 0, capsys.readouterr()
    with Image.open(out / "gray.png") as mask:
        assert mask.size == (93, 67)
    expected = Segmenter.from_checkpoint(checkpoint, device="cpu", mode="sliding", window=(32, 48), stride=(20, 30),
                                         flip=True).predict(photos / "gray.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out / "gray.png")), expected)


def test_scales_and_flip_predict_as_the_segmenter_does(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "out"
    status = _run(checkpoint, photos / "street.jpg", "--out", out, "--scales", "1", "1.5", "--flip", "--no-overlay")
    assert status == 0, capsys.readouterr()
    expected = Segmenter.from_checkpoint(checkpoint, device="cpu", scales=(1, 1.5), flip=True).predict(photos / "street.jpg")
    written = np.asarray(Image.open(out / "street.png"))
    np.testing.assert_array_equal(written, expected)
    plain = Segmenter.from_checkpoint(checkpoint, device="cpu", flip=True).predict(photos / "street.jpg")
    assert (plain != written).any()  # the scales were applied


def test_a_scale_that_is_not_positive_is_a_usage_error(checkpoint, photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(checkpoint, photos / "street.jpg", "--out", tmp_path / "out", "--scales", "1", "0")
    assert exit_info.value.code == 2
    assert "--scales" in capsys.readouterr().err


def test_repeated_stems_get_distinct_outputs(checkpoint, photos, tmp_path, capsys):
    Image.open(photos / "gray.png").convert("RGB").save(photos / "gray.jpg")
    out = tmp_path / "out"
    assert _run(checkpoint, photos / "gray.png", photos / "gray.jpg", "--out", out) == 0
    assert {"gray.png", "gray-2.png"} <= {p.name for p in out.iterdir()}


def test_refuses_to_overwrite_inputs(checkpoint, photos, capsys):
    status = _run(checkpoint, photos / "gray.png", "--out", photos)
    assert status == 2
    assert "overwrite" in capsys.readouterr().err


def test_bad_checkpoint_is_a_clean_error(photos, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    # The file exists but its content cannot be read: a failure at run time (1), not a usage error (2).
    assert _run(bad, photos, "--out", tmp_path / "out") == 1
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert _run(tmp_path / "missing.pt", photos, "--out", tmp_path / "out") == 2  # what was typed is wrong
    assert "checkpoint not found" in capsys.readouterr().err


def test_mask_with_an_unknown_colour_fails_its_image_with_a_clear_error(checkpoint, photos, tmp_path, capsys):
    # One policy with training and `fcnseg eval`: a colour outside the class list is an error naming the
    # mask, the colour and where it is, not a region silently shown as void (the former behaviour).
    masks = tmp_path / "masks"
    masks.mkdir()
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, 48:] = COLORS[1]
    rgb[10, 70] = (1, 2, 3)
    Image.fromarray(rgb).save(masks / "street.png")
    out = tmp_path / "out"
    status = _run(checkpoint, photos / "street.jpg", photos / "gray.png", "--out", out, "--masks", masks)
    captured = capsys.readouterr()
    assert status == 1
    assert "1 ok, 1 failed" in captured.out
    message = r"street.png: colour \(1, 2, 3\) at row 10, column 70 is not a class colour .*repaint"
    assert re.search(message, captured.out) and re.search(message, captured.err)
    assert not (out / "street.png").exists()  # no outputs for the failed image
    assert (out / "gray_grid.png").is_file()  # the other image goes on (it has no mask: no third column)

    rgb[10, 70] = COLORS[2]  # every colour a class colour: fine
    Image.fromarray(rgb).save(masks / "street.png")
    assert _run(checkpoint, photos / "street.jpg", "--out", out, "--masks", masks / "street.png") == 0


def test_rotated_phone_photo_gives_upright_outputs(checkpoint, tmp_path, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x64 (HxW), shown 64x40
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(
        tmp_path / "phone.jpg", exif=exif, quality=95)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.ones((64, 40), np.uint8), "L").save(masks / "phone.png")  # drawn on the upright photo
    out = tmp_path / "out"
    assert _run(checkpoint, tmp_path / "phone.jpg", "--out", out, "--masks", masks) == 0
    assert "warning" not in capsys.readouterr().err  # the mask fits the upright photo
    for name in ("phone.png", "phone_overlay.png"):
        with Image.open(out / name) as written:
            assert written.size == (40, 64)  # (W, H) as a viewer shows the photo
