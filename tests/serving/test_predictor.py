"""`Predictor`: an upload's mask is `fcnseg predict`'s file, byte for byte; refusals say what is wrong."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.inference.segmenter import Segmenter
from fcnseg.serving.predictor import Predictor, UploadError
from tests.serving.helpers import photo, png_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_mask_is_the_file_fcnseg_predict_writes(checkpoint, segmenter, tmp_path):
    path = tmp_path / "street.jpg"
    Image.fromarray(photo(1, (67, 93))).save(path, quality=90)
    assert main(["predict", str(checkpoint), str(path), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress"]) == 0
    result = Predictor(segmenter).predict(path.read_bytes(), "street.jpg")
    assert result.png == (tmp_path / "out" / "street.png").read_bytes()
    ids = np.asarray(Image.open(io.BytesIO(result.png)))
    assert result.size == ids.shape == (67, 93)
    assert result.counts == [int((ids == k).sum()) for k in range(3)]


def test_sliding_and_flip_are_switched_per_request(checkpoint, segmenter):
    data = png_bytes(photo(2, (64, 96)))
    predictor = Predictor(segmenter)
    got = {}
    for mode, flip in (("sliding", True), ("whole", True), ("sliding", False), (None, None)):
        expected = Segmenter.from_checkpoint(checkpoint, device="cpu", window=(32, 48), mode=mode or "whole",
                                             flip=bool(flip)).predict(photo(2, (64, 96)))
        got[mode, flip] = np.asarray(Image.open(io.BytesIO(predictor.predict(data, mode=mode, flip=flip).png)))
        np.testing.assert_array_equal(got[mode, flip], expected)
    assert (got["sliding", False] != got[None, None]).any()  # the switch matters for this image
    assert (segmenter.mode, segmenter.flip) == ("whole", False)  # the last request asked for the defaults


def test_exif_orientation_is_applied_as_the_reader_does(segmenter):
    image = Image.fromarray(photo(3, (40, 64)))
    exif = Image.Exif()
    exif[0x0112] = 6  # turned by 90 degrees: the upright picture is 64 high, 40 wide
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    assert Predictor(segmenter).predict(buffer.getvalue(), "phone.jpg").size == (64, 40)


@pytest.mark.parametrize("data, name, status, words", [
    (b"", "empty.png", 400, "empty"),
    (b"just some text, not a picture", "notes.jpg", 400, "notes.jpg"),
    (png_bytes(photo(0, (8, 8)))[:60], "cut.png", 400, "cut.png"),
])
def test_unreadable_uploads_are_refused_with_the_file_named(segmenter, data, name, status, words):
    with pytest.raises(UploadError) as caught:
        Predictor(segmenter).predict(data, name)
    assert caught.value.status == status and words in str(caught.value)
    assert "fcnseg-serve-" not in str(caught.value)  # the temporary path never shows


def test_caps_on_bytes_and_pixels(segmenter):
    big = png_bytes(np.zeros((300, 400, 3), np.uint8))
    with pytest.raises(UploadError, match="above the upload cap") as caught:
        Predictor(segmenter, max_upload_bytes=len(big) - 1).predict(big, "big.png")
    assert caught.value.status == 413
    with pytest.raises(UploadError, match=r"400x300 \(WxH\) = 120,000 pixels, above the cap of 119,999") as caught:
        Predictor(segmenter, max_pixels=119_999).predict(big, "big.png")
    assert caught.value.status == 413
    assert Predictor(segmenter, max_pixels=120_000).predict(big, "big.png").size == (300, 400)


def test_a_browser_path_in_the_file_name_is_only_shown_by_its_base_name(segmenter):
    with pytest.raises(UploadError) as caught:
        Predictor(segmenter).predict(b"nope", "C:\\Users\\me\\..\\secret\\x.jpg")
    assert str(caught.value).startswith("x.jpg:")
