"""`fcnseg predict` loses nothing: distinct names for same-stem inputs, manifest.jsonl, no silent overwrites;
and its command-line mistakes are usage errors (exit status 2) found before any image is predicted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.inference.inputs import output_names
from fcnseg.inference.manifest import Manifest
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = fcn_resnet18(variant="32s", num_classes=2, weights_backbone=None)
    return save_checkpoint(make_checkpoint(model, classes=["bg", "fg"], colors=[(0, 0, 0), (255, 0, 0)],
                                           config={"crop": [32, 32]}),
                           tmp_path_factory.mktemp("ck") / "m.pt")


def _photo(path: Path, height: int = 24, width: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _predict(*argv: object) -> int:
    return main(["predict", *map(str, argv), "--no-progress", "--device", "cpu"])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_same_stems_get_distinct_names_and_the_manifest_lists_every_input(checkpoint, tmp_path, capsys):
    a, b = _photo(tmp_path / "a" / "x.jpg"), _photo(tmp_path / "b" / "x.jpg", 30, 20, seed=1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert _predict(checkpoint, a, b, tmp_path / "broken.png", tmp_path / "none.jpg", "--out", out) == 1
    capsys.readouterr()
    assert {"x.png", "x_overlay.png", "x-2.png", "x-2_overlay.png"} <= {p.name for p in out.iterdir()}
    with Image.open(out / "x-2.png") as second:
        assert second.size == (20, 30)  # b/x.jpg's prediction, not a's overwritten
    assert len(_records(out)) == 4
    by_input = {r["input"]: r for r in _records(out)}
    assert by_input[str(a.resolve())] == {"input": str(a.resolve()), "outputs": ["x.png", "x_overlay.png"],
                                          "size": [24, 40], "status": "ok", "error": None,
                                          "bytes": [(out / n).stat().st_size for n in ("x.png", "x_overlay.png")]}
    assert by_input[str(b.resolve())]["outputs"] == ["x-2.png", "x-2_overlay.png"]
    assert by_input[str(b.resolve())]["size"] == [30, 20]
    broken = by_input[str((tmp_path / "broken.png").resolve())]
    assert broken["status"] == "failed" and "broken.png" in broken["error"] and broken["outputs"] == []
    assert by_input[str(tmp_path / "none.jpg")]["error"] == "no such file or folder"


def test_an_earlier_run_for_other_inputs_is_not_overwritten(checkpoint, tmp_path, capsys):
    first, second = _photo(tmp_path / "a" / "x.jpg"), _photo(tmp_path / "b" / "x.jpg", seed=1)
    out = tmp_path / "out"
    assert _predict(checkpoint, first, "--out", out) == 0
    written = (out / "x.png").read_bytes()
    capsys.readouterr()

    assert _predict(checkpoint, second, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{out / 'x.png'} exists (written for {first.resolve()} by an earlier run)" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert (out / "x.png").read_bytes() == written and len(_records(out)) == 1

    assert _predict(checkpoint, first, "--out", out, "--grid") == 0  # the same input again: its own files
    assert [r["outputs"] for r in _records(out)] == [["x.png", "x_overlay.png", "x_grid.png"]]

    assert _predict(checkpoint, second, "--out", out, "--overwrite") == 0
    assert [r["input"] for r in _records(out)] == [str(second.resolve())]  # the replaced record is gone


def test_runs_into_one_folder_add_up_in_the_manifest(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert _predict(checkpoint, _photo(tmp_path / "one.jpg"), "--out", out) == 0
    assert _predict(checkpoint, _photo(tmp_path / "two.jpg"), "--out", out) == 0
    assert [Path(r["input"]).name for r in _records(out)] == ["one.jpg", "two.jpg"]


def test_a_file_no_manifest_accounts_for_is_not_overwritten(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_overlay.png").write_bytes(b"someone's figure")
    assert _predict(checkpoint, _photo(tmp_path / "x.jpg"), "--out", out) == 2
    assert "x_overlay.png exists (not listed in manifest.jsonl)" in capsys.readouterr().err
    assert (out / "x_overlay.png").read_bytes() == b"someone's figure"


def test_output_names_never_share_a_file():
    names = output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("x_overlay.jpg"), Path("c/X.png")], grid=True)
    files = [f.casefold() for outputs in names.values() for f in outputs]
    assert len(files) == len(set(files)) == 12
    assert names[Path("a/x.jpg")] == ["x.png", "x_overlay.png", "x_grid.png"]
    assert names[Path("b/x.jpg")][0] == "x-2.png"


def test_jpeg_overlays_look_like_the_png_ones_and_switching_format_redoes_the_input(checkpoint, tmp_path, capsys):
    photo = _photo(tmp_path / "x.jpg", 48, 64)
    png_out, jpg_out = tmp_path / "png", tmp_path / "jpg"
    assert _predict(checkpoint, photo, "--out", png_out) == 0
    assert _predict(checkpoint, photo, "--out", jpg_out, "--overlay-format", "jpg") == 0
    assert sorted(p.name for p in jpg_out.iterdir()) == ["manifest.jsonl", "x.png", "x_overlay.jpg"]
    assert _records(jpg_out)[0]["outputs"] == ["x.png", "x_overlay.jpg"]
    with Image.open(jpg_out / "x_overlay.jpg") as jpg, Image.open(png_out / "x_overlay.png") as png:
        assert jpg.format == "JPEG" and jpg.size == png.size == (64, 48)
        difference = np.abs(np.asarray(jpg, dtype=np.int16) - np.asarray(png.convert("RGB"), dtype=np.int16))
    assert difference.mean() < 12  # lossy on a noise photo, but the same picture
    assert (jpg_out / "x.png").read_bytes() == (png_out / "x.png").read_bytes()  # label maps stay lossless PNG
    # a PNG overlay asked for where a JPEG one was written: the input is not done, and is redone
    assert _predict(checkpoint, photo, "--out", jpg_out) == 0
    assert "1 ok" in capsys.readouterr().out and (jpg_out / "x_overlay.png").is_file()


def test_manifest_skips_a_line_cut_short(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"input": "/a.jpg", "outputs": ["a.png"], "status": "ok"}\n{"inp')
    manifest = Manifest(tmp_path)
    assert manifest.owner("a.png") == "/a.jpg" and manifest.owner("b.png") is None


@pytest.mark.parametrize(("arguments", "message"), [
    (["--out", "{tmp}/photo.jpg"], "photo.jpg is a file; give a folder"),
    (["--mode", "sliding", "--window", "32x32", "--stride", "40x40"], "stride 40x40 is larger than the window 32x32"),
    (["--mode", "sliding", "--stride", "40x8"], "stride 40x8 is larger than the window 32x32"),  # the training crop
    (["--alpha", "1.5"], "--alpha must be between 0 and 1"),
    (["--masks", "{tmp}/nowhere"], "--masks {tmp}/nowhere: no such file or folder"),
])
def test_mistakes_are_refused_before_any_image(arguments, message, checkpoint, tmp_path, capsys):
    photo = _photo(tmp_path / "photo.jpg")
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "out")]
    assert _predict(checkpoint, photo, *arguments) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_overlay_format_is_a_usage_error(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _predict(checkpoint, _photo(tmp_path / "photo.jpg"), "--out", tmp_path / "out", "--overlay-format", "gif")
    assert stop.value.code == 2
    assert "argument --overlay-format: invalid choice: 'gif'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_usage_error(checkpoint, tmp_path, capsys):
    assert main(["predict", str(checkpoint), str(_photo(tmp_path / "p.jpg")), "--out", str(tmp_path / "out"),
                 "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_max_pixels_refuses_larger_images(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(checkpoint, _photo(tmp_path / "big.jpg"), "--out", out, "--max-pixels", "100") == 1
    captured = capsys.readouterr()
    assert "above the cap of 100 pixels" in captured.out
    assert _records(out)[0]["status"] == "failed"
