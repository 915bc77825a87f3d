"""Image reading for prediction: every PIL mode to 8-bit RGB, clear errors for bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.errors import DataError, FcnsegError
from fcnseg.imageio import list_images, load_image, load_mask, to_rgb_array

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_rgb_png_round_trips(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), RGB)


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_grayscale_is_replicated(tmp_path, mode):
    gray = Image.fromarray(RGB[..., 0]).convert(mode)
    gray.save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    expected = np.asarray(gray.convert("L"))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    values = np.array([[0, 257, 65535], [32896, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # PIL writes a 16-bit grayscale PNG
    out = load_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 255], [128, 4, 254]])


def test_palette_and_rgba_lose_nothing_but_alpha(tmp_path):
    palette_image = Image.fromarray(RGB).quantize(8)
    palette_image.info.pop("transparency", None)
    palette_image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), np.asarray(palette_image.convert("RGB")))
    rgba = np.dstack([RGB, np.full((5, 7), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    np.testing.assert_array_equal(load_image(tmp_path / "t.png"), RGB)


def test_float_image_mode_f():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(to_rgb_array(image)[..., 0], [[0, 128, 255]])


@pytest.mark.parametrize("content", [b"", b"definitely not an image", None])
def test_bad_files_raise_a_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # a truncated JPEG: valid header, missing data
        buffer = tmp_path / "good.jpg"
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, quality=95)
        content = buffer.read_bytes()[:400]
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.jpg"):
        load_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FcnsegError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(FcnsegError, match="folder"):
        load_image(tmp_path)


def test_arrays_and_tensors():
    np.testing.assert_array_equal(to_rgb_array(torch.from_numpy(RGB).permute(2, 0, 1)), RGB)
    np.testing.assert_array_equal(to_rgb_array(torch.from_numpy(RGB).permute(2, 0, 1).float() / 255), RGB)
    np.testing.assert_array_equal(to_rgb_array(RGB[..., 0])[..., 2], RGB[..., 0])
    with pytest.raises(ValueError, match="shape"):
        to_rgb_array(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_array(torch.zeros(1, 3, 4, 4))


def test_masks_palette_gray_and_colour(tmp_path):
    ids = np.array([[0, 1, 2], [255, 1, 0]], dtype=np.uint8)
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.save(tmp_path / "p.png")
    Image.fromarray(ids, mode="L").save(tmp_path / "l.png")
    colors = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[ids == 1] = colors[1]
    rgb[ids == 2] = colors[2]
    rgb[ids == 255] = (9, 9, 9)  # not a class colour: void
    Image.fromarray(rgb).save(tmp_path / "c.png")
    for name in ("p.png", "l.png", "c.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name, colors), ids.astype(np.int64), err_msg=name)
    with pytest.raises(DataError, match="colour"):
        load_mask(tmp_path / "c.png")


def test_list_images_filters_by_extension(tmp_path):
    for name in ("b.JPG", "a.png", "notes.txt", "c.tiff"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.tiff"]
