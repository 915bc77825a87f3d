"""`predict_files`: streaming bulk prediction, batches of equal sizes, resuming, failures, videos."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.errors import OptionError
from fcnseg.inference import bulk
from fcnseg.inference.bulk import predict_files
from fcnseg.inference.reading import ImageItem, group_by_size
from fcnseg.inference.segmenter import Segmenter
from tests.conftest import tiny_fcn

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["bg", "a", "b"]
COLORS = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


class CountingSegmenter(Segmenter):
    """A Segmenter that remembers the batch shape of every forward pass."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[tuple[int, ...]] = []

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        self.passes.append(tuple(image.shape))
        return super().logits(image)


@pytest.fixture
def segmenter() -> CountingSegmenter:
    return CountingSegmenter(tiny_fcn("8s"), CLASSES, COLORS, device="cpu", amp="none", batch_size=3)


def _photos(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"p{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_equal_sizes_share_passes_and_outputs_match_the_segmenter(segmenter, tmp_path):
    sizes = [(32, 48)] * 5 + [(40, 24)] * 2
    photos = _photos(tmp_path / "in", sizes)
    result = predict_files(segmenter, [tmp_path / "in"], tmp_path / "out", report=pytest.fail)
    assert (result.ok, result.skipped, result.failures) == (7, 0, [])
    # 5 images of one size in passes of 3: 3 + 2; the 2 of the other size: one pass.
    assert sorted(s[0] for s in segmenter.passes) == [2, 2, 3]
    assert {s[-2:] for s in segmenter.passes} == {(32, 48), (40, 24)}
    expected = segmenter.predict([str(p) for p in photos])  # the same batching: equal logits
    for path, label in zip(photos, expected):
        with Image.open(tmp_path / "out" / f"{path.stem}.png") as written:
            np.testing.assert_array_equal(np.asarray(written), label)
        assert (tmp_path / "out" / f"{path.stem}_overlay.png").is_file()
    records = _records(tmp_path / "out")
    assert [Path(r["input"]).name for r in records] == [p.name for p in photos]
    assert all(r["status"] == "ok" for r in records) and records[5]["size"] == [40, 24]


def test_without_overlays_only_label_maps_are_written_and_asking_for_them_later_redoes_the_run(segmenter, tmp_path):
    # an input whose stem ends like an overlay's: its label map must not be taken for one
    photos = _photos(tmp_path / "in", [(32, 48)] * 2)
    photos.append(photos[1].rename(tmp_path / "in" / "q_overlay.png"))
    photos.pop(1)
    out = tmp_path / "out"
    result = predict_files(segmenter, [tmp_path / "in"], out, overlay=False, grid=True, report=pytest.fail)
    assert result.ok == 2
    assert sorted(p.name for p in out.glob("*.png")) == ["p00.png", "p00_grid.png", "q_overlay.png",
                                                         "q_overlay_grid.png"]
    expected = segmenter.predict([str(p) for p in photos])
    for path, label in zip(photos, expected):
        with Image.open(out / f"{path.stem}.png") as written:
            np.testing.assert_array_equal(np.asarray(written), label)  # the label map, not an overlay
    assert [r["outputs"] for r in _records(out)] == [["p00.png", "p00_grid.png"],
                                                     ["q_overlay.png", "q_overlay_grid.png"]]
    # asking for the overlays now: those inputs are not done, and are redone with them
    again = predict_files(segmenter, [tmp_path / "in"], out, grid=True, report=pytest.fail)
    assert (again.ok, again.skipped) == (2, 0)
    assert (out / "p00_overlay.png").is_file() and (out / "q_overlay_overlay.png").is_file()


def test_workers_decode_and_give_the_same_outputs(segmenter, tmp_path):
    _photos(tmp_path / "in", [(32, 48)] * 4)
    predict_files(segmenter, [tmp_path / "in"], tmp_path / "zero")
    predict_files(segmenter, [tmp_path / "in"], tmp_path / "two", workers=2)
    for name in (f"p{i:02d}{suffix}.png" for i in range(4) for suffix in ("", "_overlay")):
        assert (tmp_path / "zero" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_a_rerun_resumes_after_a_kill_and_never_counts_a_partial_output(segmenter, tmp_path, monkeypatch):
    photos = _photos(tmp_path / "in", [(32, 48)] * 6)
    out = tmp_path / "out"
    real_write, written = bulk.write_outputs, []

    def dying_write(seg, item, pred, folder, names, options):  # the process dies after the 4th image
        if len(written) == 4:
            (folder / f".{names[0]}.999.tmp").write_bytes(b"half a png")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        real_write(seg, item, pred, folder, names, options)
        written.append(names[0])

    monkeypatch.setattr(bulk, "write_outputs", dying_write)
    with pytest.raises(KeyboardInterrupt):
        predict_files(segmenter, [tmp_path / "in"], out)
    monkeypatch.setattr(bulk, "write_outputs", real_write)
    statuses = [r["status"] for r in _records(out)]
    assert statuses.count("ok") == 4 and statuses.count("pending") == 6  # pending first, then 4 finished
    # A file of a finished input cut short afterwards: its record no longer holds.
    (out / "p01_overlay.png").write_bytes((out / "p01_overlay.png").read_bytes()[:20])
    kept = (out / "p00.png").stat().st_mtime_ns

    segmenter.passes.clear()
    result = predict_files(segmenter, [tmp_path / "in"], out)
    assert (result.ok, result.skipped, result.failures) == (3, 3, [])  # p01, p04, p05 redone
    assert sum(s[0] for s in segmenter.passes) == 3
    assert (out / "p00.png").stat().st_mtime_ns == kept
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    records = _records(out)
    assert [Path(r["input"]).name for r in records] == [p.name for p in photos]  # one record per input
    assert all(r["status"] == "ok" for r in records)
    with Image.open(out / "p01_overlay.png") as redone:
        redone.load()

    segmenter.passes.clear()
    assert predict_files(segmenter, [tmp_path / "in"], out, overwrite=True).ok == 6
    assert sum(s[0] for s in segmenter.passes) == 6


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_and_unwritable_inputs_fail_alone(segmenter, tmp_path, monkeypatch, workers):
    _photos(tmp_path / "in", [(32, 48)] * 3)
    (tmp_path / "in" / "zz.png").write_bytes(b"not a png")
    from fcnseg.inference import writing

    real = writing.save_atomically

    def full_disk(path, save):
        if path.name == "p01_overlay.png":
            raise OSError(28, "No space left on device")
        return real(path, save)

    monkeypatch.setattr(writing, "save_atomically", full_disk)
    lines: list[str] = []
    out = tmp_path / "out"
    result = predict_files(segmenter, [tmp_path / "in"], out, report=lines.append, workers=workers)
    assert result.ok == 2 and [Path(f).name for f, _ in result.failures] == ["p01.png", "zz.png"]
    assert len(lines) == 2 and "No space left on device" in lines[0] and "zz.png" in lines[1]
    assert not (out / "p01.png").exists()  # its label map was written before the overlay failed: removed
    by_name = {Path(r["input"]).name: r for r in _records(out)}
    assert by_name["p01.png"]["status"] == by_name["zz.png"]["status"] == "failed"
    assert by_name["p00.png"]["status"] == "ok"


def test_group_by_size_holds_a_bounded_number_of_images():
    def item(i, h):
        return ImageItem(i, torch.zeros(h, 4, 3, dtype=torch.uint8))

    sizes = [1, 2, 3, 4, 5, 1, 1, 6]
    items = [item(i, h) for i, h in enumerate(sizes)] + [ImageItem(99, error="bad")]
    groups = list(group_by_size(items, per_pass=3, max_held=4))
    assert sorted(i.index for g in groups for i in g) == [*range(8), 99]
    assert all(len({tuple(i.image.shape) for i in g}) == 1 for g in groups if g[0].image is not None)
    # the three images of height 1 meet in one pass only if held; with at most 4 held, the first goes early
    assert [[i.index for i in g] for g in groups][0] == [0]


def test_videos_go_to_the_video_writer_and_into_the_manifest(segmenter, tmp_path, monkeypatch):
    calls = []

    def predict_video(seg, path, out_dir, name, *, frame_masks, alpha, batch_size):
        calls.append((Path(path).name, name, frame_masks, alpha, batch_size))
        if "broken" in str(path):
            raise OptionError(f"{path}: cannot decode the video")
        target = Path(out_dir) / f"{name}_overlay.mp4"
        target.write_bytes(b"frames")
        masks = Path(out_dir) / f"{name}_masks"
        masks.mkdir(exist_ok=True)
        for i in range(2):
            (masks / f"{i}.png").write_bytes(b"m" * (i + 1))
        return [target, masks]

    monkeypatch.setitem(sys.modules, "fcnseg.inference.video", types.SimpleNamespace(predict_video=predict_video))
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "broken.MKV").write_bytes(b"")
    _photos(tmp_path, [(32, 48)])
    out = tmp_path / "out"
    result = predict_files(segmenter, [tmp_path], out, frame_masks=True, alpha=0.3, report=lambda line: None)
    assert calls == [("broken.MKV", "broken", True, 0.3, 3), ("clip.mp4", "clip", True, 0.3, 3)]
    assert result.ok == 2 and len(result.failures) == 1 and "cannot decode the video" in result.failures[0][1]
    clip = next(r for r in _records(out) if r["input"].endswith("clip.mp4"))
    assert clip["outputs"] == ["clip_overlay.mp4", "clip_masks"] and clip["status"] == "ok"
    assert clip["bytes"] == [6, 3]  # a folder of outputs counts the bytes of its files

    calls.clear()  # done videos are skipped; the failed one is tried again
    assert predict_files(segmenter, [tmp_path], out, report=lambda line: None).skipped == 2
    assert [c[0] for c in calls] == ["broken.MKV"]
    (out / "clip_masks" / "1.png").unlink()  # a frame lost since: the video is done again
    calls.clear()
    assert predict_files(segmenter, [tmp_path], out, report=lambda line: None).skipped == 1
    assert sorted(c[0] for c in calls) == ["broken.MKV", "clip.mp4"]


def test_share_of_each_rank_is_disjoint_and_covers_everything(tmp_path):
    photos = _photos(tmp_path / "in", [(8, 8)] * 7)
    plan = bulk.plan_run([tmp_path / "in"], tmp_path / "out", grid=False, overwrite=False)
    shares = [plan.todo[rank::3] for rank in range(3)]
    assert sorted(p for share in shares for p in share) == sorted(photos)
    assert sum(len(s) for s in shares) == 7


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("dtype", [np.int64, np.uint8])
@pytest.mark.parametrize("classes", [4, 120])  # 120: a table too large for 16-bit indices
def test_blend_equals_visualize_overlay_bit_for_bit(alpha, dtype, classes):
    from fcnseg.inference.writing import blend
    from fcnseg.visualize import overlay

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ids = rng.integers(-1 if dtype == np.int64 else 0, classes + 1, (37, 53))  # -1 and `classes` have no colour
    ids[0, :10] = 255
    ids = ids.astype(dtype)
    colors = [(0, 0, 0), (255, 0, 0), (12, 200, 99), (1, 2, 3)]
    colors += [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(classes - len(colors))]
    np.testing.assert_array_equal(blend(image, ids, colors, alpha, 255),
                                  overlay(image, ids, colors, alpha, ignore_index=255))
    np.testing.assert_array_equal(blend(image, ids, colors, alpha, 2), overlay(image, ids, colors, alpha, ignore_index=2))


def test_a_manifest_that_cannot_be_written_stops_the_run_with_a_clear_error(segmenter, tmp_path, monkeypatch):
    from fcnseg.errors import FcnsegError

    _photos(tmp_path / "in", [(32, 48)] * 2)
    real_open = Path.open

    def full_disk(self, mode="r", *args, **kwargs):
        if self.name == "manifest.jsonl" and mode == "a":
            raise OSError(28, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(FcnsegError, match=r"cannot append to .*manifest.jsonl \(No space left on device\); stopping"):
        predict_files(segmenter, [tmp_path / "in"], tmp_path / "out")


def test_an_out_that_cannot_be_created_is_a_usage_error_before_any_work(segmenter, tmp_path):
    _photos(tmp_path / "in", [(32, 48)])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OptionError, match=r"--out .*afile/sub: cannot create the folder"):
        predict_files(segmenter, [tmp_path / "in"], tmp_path / "afile" / "sub")
    with pytest.raises(OptionError, match="afile is a file; give a folder"):
        predict_files(segmenter, [tmp_path / "in"], tmp_path / "afile")
    assert segmenter.passes == []
    with pytest.raises(OptionError, match="--overlay-format must be one of png, jpg, got 'gif'"):
        predict_files(segmenter, [tmp_path / "in"], tmp_path / "out", overlay_format="gif")
    assert segmenter.passes == [] and not (tmp_path / "out").exists()


def test_read_ahead_keeps_order_stops_with_its_caller_and_passes_errors_on():
    import threading

    from fcnseg.inference.reading import read_ahead

    class Items:
        def __init__(self, n, broken=None):
            self.n, self.broken, self.read = n, broken, []

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if i == self.broken:
                raise RuntimeError("a bug in a reader")
            self.read.append(i)
            return ImageItem(i)

    assert [item.index for item in read_ahead(Items(7), depth=2)] == list(range(7))
    source = Items(1000)
    stream = read_ahead(source, depth=3)
    assert [next(stream).index for _ in range(2)] == [0, 1]
    stream.close()  # the caller stops: the thread ends without reading everything
    assert len(source.read) <= 2 + 3 + 1 and not any(t.name == "fcnseg-reader" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="a bug in a reader"):
        list(read_ahead(Items(5, broken=3), depth=2))
