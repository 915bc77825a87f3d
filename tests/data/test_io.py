"""Reading images and masks: every pixel format, and every bad file named in the error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.data.io import check_same_size, image_size, read_image, read_mask
from fcnseg.errors import DataError

RNG = np.random.default_rng(0)


def test_rgb_image_reads_as_uint8_chw(tmp_path):
    pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    assert image_size(tmp_path / "x.png") == (5, 7)


def test_grayscale_is_replicated(tmp_path):
    gray = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    for c in range(3):
        assert torch.equal(image[c], torch.from_numpy(gray))


def test_rgba_drops_alpha_without_blending(tmp_path):
    rgba = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: blending would change the colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))


def test_palette_image_expands_to_colours(tmp_path):
    ids = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(ids, "P")
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    image.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out[:, 1, 0].tolist() == [70, 80, 90] and out[:, 0, 1].tolist() == [40, 50, 60]


def test_16bit_image_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.shape == (3, 1, 4) and out[0].tolist() == [[0, 1, 255, 128]]


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.jpg"):
        read_image(tmp_path / "junk.jpg")
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png.*(corrupt|truncated)"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")


def test_palette_mask_reads_as_its_indices(tmp_path, write_palette_png):
    ids = RNG.integers(0, 21, (9, 11))
    ids[0] = 255
    write_palette_png(tmp_path / "m.png", ids)
    assert Image.open(tmp_path / "m.png").mode == "P"
    mask = read_mask(tmp_path / "m.png", num_classes=21)
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(ids))


def test_void_id_becomes_255(tmp_path):
    ids = np.array([[0, 11, 10]], dtype=np.uint8)
    Image.fromarray(ids, "L").save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", num_classes=11, void_id=11).tolist() == [[0, 255, 10]]


def test_16bit_mask_in_range_is_fine(tmp_path):
    ids = np.array([[0, 3, 300]], dtype=np.uint16)
    Image.fromarray(ids).save(tmp_path / "m16.png")
    assert read_mask(tmp_path / "m16.png", num_classes=301, void_id=300).tolist() == [[0, 3, 255]]


def test_labels_out_of_range_are_an_error(tmp_path):
    Image.fromarray(np.array([[0, 1, 7, 9]], dtype=np.uint8), "L").save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad.png: label values 7, 9 are outside 0..2"):
        read_mask(tmp_path / "bad.png", num_classes=3)


def test_colour_mask_is_matched_to_class_colours(tmp_path):
    colors = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    ids = np.array([[0, 1, 2, 255]])
    rgb = np.array([[colors[i] if i != 255 else (9, 9, 9) for i in row] for row in ids], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    mask = read_mask(tmp_path / "c.png", num_classes=3, colors=colors, void_colors=[(9, 9, 9)])
    assert mask.tolist() == [[0, 1, 2, 255]]
    rgb[0, 2] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "c2.png")
    with pytest.raises(DataError, match=r"c2.png: colour \(1, 2, 3\) at row 0, column 2"):
        read_mask(tmp_path / "c2.png", num_classes=3, colors=colors)


def test_rgb_mask_without_colours(tmp_path):
    gray = np.array([[0, 1, 2]], dtype=np.uint8)
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "g.png")
    assert read_mask(tmp_path / "g.png", num_classes=3).tolist() == [[0, 1, 2]]
    Image.fromarray(np.array([[[0, 1, 2]]], dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: colour"):
        read_mask(tmp_path / "rgb.png", num_classes=3)


def test_size_mismatch_names_both_files(tmp_path):
    with pytest.raises(DataError, match=r"m.png: mask is 4x5 \(HxW\) but its image .*i.jpg is 4x6"):
        check_same_size(torch.zeros(3, 4, 6), torch.zeros(4, 5), tmp_path / "i.jpg", tmp_path / "m.png")
