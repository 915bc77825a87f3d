"""`predict_video` on small videos made here with PyAV: every frame, the same rate, masks equal to
`Segmenter.predict` on the decoded frames, atomic outputs, clear errors for what is not a video."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.errors import FcnsegError, OptionError, UsageError
from fcnseg.inference.segmenter import Segmenter
from fcnseg.inference.video import predict_video
from tests.conftest import tiny_fcn

av = pytest.importorskip("av")

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def segmenter():
    net = tiny_fcn("8s", seed=1)
    with torch.no_grad():  # zero biases: the tiny FCN then predicts all three classes, not one
        for name, param in net.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    return Segmenter(net, CLASSES, COLORS, device="cpu", amp="none")


def _make_video(path, frames: int = 6, size=(64, 96), rate=Fraction(12), codec="mpeg4") -> None:
    """A small video of moving gradients, written with PyAV independently of fcnseg's writer."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for index in range(frames):
            image = np.stack([(yy * 4 + index * 20) % 256, (xx * 3) % 256, ((yy + xx) * 2 + index * 9) % 256], -1)
            frame = av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _decode(path) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


@pytest.mark.parametrize(("batch_size", "mode"), [(4, "whole"), (1, "whole"), (4, "sliding")])
def test_every_frame_at_the_same_rate_with_masks_equal_to_predict(segmenter, tmp_path, batch_size, mode):
    if mode == "sliding":
        segmenter = Segmenter(segmenter.model, CLASSES, COLORS, device="cpu", amp="none", mode="sliding",
                              window=(48, 64), stride=(32, 40), optimize=False)
    clip = tmp_path / "clip.mp4"
    _make_video(clip)
    frames, rate = _decode(clip)
    written = predict_video(segmenter, clip, tmp_path / "out", "clip", frame_masks=True, alpha=0.5,
                            batch_size=batch_size)
    overlay_path, masks_dir = tmp_path / "out" / "clip_overlay.mp4", tmp_path / "out" / "clip_masks"
    assert written == [overlay_path, masks_dir]
    overlays, out_rate = _decode(overlay_path)
    assert len(overlays) == len(frames) == 6 and out_rate == rate == 12
    assert overlays[0].shape == frames[0].shape
    masks = sorted(masks_dir.iterdir())
    assert [m.name for m in masks] == [f"{i:06d}.png" for i in range(6)]
    expected = segmenter.predict(frames)
    for mask_path, want in zip(masks, expected):
        mask = Image.open(mask_path)
        assert mask.mode == "P" and mask.getpalette()[:9] == [v for c in COLORS for v in c]
        np.testing.assert_array_equal(np.asarray(mask), want)
    assert len(np.unique(np.stack(expected))) == 3  # the masks compared are not constant
    # The overlay shows the colours where the masks say (lossy video: compare a class's mean colour).
    thing = expected[0] == 1
    blended = frames[0][thing].astype(float) * 0.5 + np.array(COLORS[1]) * 0.5
    assert np.abs(overlays[0][thing].astype(float).mean(0) - blended.mean(0)).max() < 12
    assert not list((tmp_path / "out").glob(".*"))  # no temporary leftovers


def test_without_masks_and_odd_sizes(segmenter, tmp_path):
    clip = tmp_path / "odd.mkv"
    _make_video(clip, frames=3, size=(50, 70), rate=Fraction(30000, 1001), codec="libx264")
    written = predict_video(segmenter, clip, tmp_path, "odd", frame_masks=False, alpha=0.3, batch_size=2)
    assert written == [tmp_path / "odd_overlay.mp4"] and not (tmp_path / "odd_masks").exists()
    overlays, rate = _decode(written[0])
    assert len(overlays) == 3 and rate == Fraction(30000, 1001)
    assert overlays[0].shape[:2] == (50, 70)  # an even size: nothing to pad


def test_odd_frame_sides_are_padded_for_the_encoder(segmenter, tmp_path):
    clip = tmp_path / "odd.avi"
    with av.open(str(clip), "w") as container:  # 4:4:4 has no even-size rule: odd sides can be stored
        stream = container.add_stream("mjpeg", rate=10)
        stream.height, stream.width, stream.pix_fmt = 33, 45, "yuvj444p"
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((33, 45, 3), 90, np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    (path,) = predict_video(segmenter, clip, tmp_path, "odd", frame_masks=False, alpha=0.5, batch_size=8)
    overlays, _ = _decode(path)
    assert len(overlays) == 2 and overlays[0].shape == (34, 46, 3)


def test_an_existing_output_is_replaced_whole(segmenter, tmp_path):
    clip = tmp_path / "clip.mp4"
    _make_video(clip, frames=2)
    (tmp_path / "clip_masks").mkdir()
    (tmp_path / "clip_masks" / "stale.png").write_bytes(b"old")
    predict_video(segmenter, clip, tmp_path, "clip", frame_masks=True, alpha=0.5, batch_size=2)
    assert sorted(p.name for p in (tmp_path / "clip_masks").iterdir()) == ["000000.png", "000001.png"]


def test_leftovers_of_a_killed_run_are_removed(segmenter, tmp_path):
    clip = tmp_path / "clip.mp4"
    _make_video(clip, frames=2)
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (tmp_path / f".clip_overlay.mp4.{dead}.tmp").write_bytes(b"half a video")
    (tmp_path / f".clip_masks.{dead}.tmp").mkdir()
    (tmp_path / f".clip_masks.{dead}.tmp" / "000000.png").write_bytes(b"half")
    (tmp_path / ".other_overlay.mp4.1.tmp").write_bytes(b"another video's: left alone")
    predict_video(segmenter, clip, tmp_path, "clip", frame_masks=True, alpha=0.5, batch_size=2)
    assert sorted(p.name for p in tmp_path.glob(".*")) == [".other_overlay.mp4.1.tmp"]


@pytest.mark.parametrize("content", [b"", b"this is not a video at all" * 40])
def test_not_a_video_is_a_clear_error_and_writes_nothing(segmenter, tmp_path, content):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(FcnsegError, match=r"cannot read video .*broken\.mp4"):
        predict_video(segmenter, bad, out, "broken", frame_masks=True, alpha=0.5, batch_size=2)
    assert list(out.iterdir()) == []


def test_truncated_video_writes_nothing(segmenter, tmp_path):
    clip = tmp_path / "clip.mp4"
    _make_video(clip, frames=6)
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) // 2])  # the index (moov) of this mp4 is at the end: now lost
    out = tmp_path / "out"
    with pytest.raises(FcnsegError, match="clip.mp4"):
        predict_video(segmenter, clip, out, "clip", frame_masks=True, alpha=0.5, batch_size=2)
    assert list(out.iterdir()) == []


def test_audio_only_file_has_no_video_stream(segmenter, tmp_path):
    sound = tmp_path / "sound.wav"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(FcnsegError, match="sound.wav has no video stream"):
        predict_video(segmenter, sound, tmp_path / "out", "sound", frame_masks=False, alpha=0.5, batch_size=1)


def test_unwritable_output_is_a_clear_error(segmenter, tmp_path):
    clip = tmp_path / "clip.mp4"
    _make_video(clip, frames=2)
    (tmp_path / "afile").write_text("a file where the output folder should be")
    with pytest.raises(FcnsegError, match=r"cannot write the outputs of .*clip\.mp4 in .*afile"):
        predict_video(segmenter, clip, tmp_path / "afile", "clip", frame_masks=True, alpha=0.5, batch_size=2)


def test_refusals_before_any_work(segmenter, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        predict_video(segmenter, tmp_path / "absent.mp4", tmp_path, "a", frame_masks=False, alpha=0.5, batch_size=1)
    with pytest.raises(OptionError, match="alpha"):
        predict_video(segmenter, tmp_path, tmp_path, "a", frame_masks=False, alpha=1.5, batch_size=1)
    with pytest.raises(OptionError, match="batch_size"):
        predict_video(segmenter, tmp_path, tmp_path, "a", frame_masks=False, alpha=0.5, batch_size=0)
