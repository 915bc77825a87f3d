"""The one reader: every pixel format decoded once, EXIF orientation, masks, every bad file named,
and broken links in folders reported (the pixel cap: test_io_pixel_cap.py)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.data.io import (
    check_same_size,
    image_size,
    image_to_tensor,
    list_images,
    read_image,
    read_mask,
    to_rgb_array,
)
from fcnseg.errors import DataError, FcnsegError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
ORIENTATION = 0x0112


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)


# --- images: every mode through one decoding --------------------------------------------------


def test_rgb_image_reads_as_uint8_chw(tmp_path):
    pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert torch.equal(image, _chw(pixels))
    assert image_size(tmp_path / "x.png") == (5, 7)


def test_rgb_png_round_trips(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    np.testing.assert_array_equal(to_rgb_array(tmp_path / "a.png"), RGB)


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_grayscale_is_replicated(tmp_path, mode):
    gray = Image.fromarray(RGB[..., 0]).convert(mode)
    gray.save(tmp_path / "g.png")
    out = to_rgb_array(tmp_path / "g.png")
    expected = np.array(gray.convert("L"))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)
        assert torch.equal(read_image(tmp_path / "g.png")[c], torch.from_numpy(expected))


def test_rgba_drops_alpha_without_blending(tmp_path):
    rgba = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: blending would change the colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), _chw(rgba[..., :3]))


def test_palette_image_expands_to_colours(tmp_path):
    ids = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(ids, "P")
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    image.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out[:, 1, 0].tolist() == [70, 80, 90] and out[:, 0, 1].tolist() == [40, 50, 60]


def test_palette_and_rgba_lose_nothing_but_alpha(tmp_path):
    palette_image = Image.fromarray(RGB).quantize(8)
    palette_image.info.pop("transparency", None)
    palette_image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(to_rgb_array(tmp_path / "p.png"), np.asarray(palette_image.convert("RGB")))
    rgba = np.dstack([RGB, np.full((5, 7), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    np.testing.assert_array_equal(to_rgb_array(tmp_path / "t.png"), RGB)


def test_16bit_image_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.shape == (3, 1, 4) and out[0].tolist() == [[0, 1, 255, 128]]


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    values = np.array([[0, 257, 65535], [32896, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # PIL writes a 16-bit grayscale PNG
    out = to_rgb_array(tmp_path / "deep.png")
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 255], [128, 4, 254]])


def test_mode_i_is_16bit_data_whatever_its_values(tmp_path):
    # One rule, not a guess from the content: mode I (e.g. 32-bit TIFF) holds 0..65535, clipped.
    Image.fromarray(np.array([[0, 200, 257, 65535, 70000]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert read_image(tmp_path / "i.tif")[0].tolist() == [[0, 1, 1, 255, 255]]


def test_float_image_mode_f():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(to_rgb_array(image)[..., 0], [[0, 128, 255]])


def test_float_image_file_is_read_not_refused(tmp_path):
    # read_image used to refuse mode F; the one decoding reads 0..1 (or 0..255) floats.
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif")[1].tolist() == [[0, 128, 255]]
    Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32), mode="F").save(tmp_path / "g.tif")
    assert read_image(tmp_path / "g.tif")[1].tolist() == [[0, 100, 255]]


def _write_mode(path, mode: str) -> None:
    """One small image per mode the reader must handle, saved in a lossless format."""
    if mode == "I;16":
        Image.fromarray(RNG.integers(0, 65536, (5, 7), dtype=np.uint16)).save(path)
    elif mode == "P":
        Image.fromarray(RGB).quantize(8).save(path)
    elif mode == "RGBA":
        Image.fromarray(np.dstack([RGB, RNG.integers(0, 256, (5, 7), dtype=np.uint8)]), "RGBA").save(path)
    elif mode == "CMYK":
        Image.fromarray(RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8), "CMYK").save(path)
    else:  # L, LA
        Image.fromarray(RGB).convert("L").convert(mode).save(path)


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".tif"),
                                          ("LA", ".png"), ("L", ".png")])
def test_every_reader_decodes_a_mode_the_same_way(tmp_path, mode, suffix):
    path = tmp_path / f"x{suffix}"
    _write_mode(path, mode)
    with Image.open(path) as opened:
        expected = np.asarray(opened.convert("RGB"))[..., :3] if mode in ("CMYK", "P", "RGBA") else None
        from_pil = to_rgb_array(opened)
    from_path = to_rgb_array(path)
    assert from_path.shape == (5, 7, 3) and from_path.dtype == np.uint8
    np.testing.assert_array_equal(from_path, from_pil)  # a path and an opened image decode alike
    assert torch.equal(read_image(path), _chw(from_path))  # datasets read what Segmenter reads
    assert torch.equal(image_to_tensor(path), _chw(from_path).float() / 255)
    if expected is not None:  # palettes expanded, alpha dropped, CMYK by Pillow's conversion
        np.testing.assert_array_equal(from_path, expected)


def test_palette_with_alpha_drops_the_alpha():
    palette = Image.fromarray(RGB).quantize(8)
    with_alpha = palette.convert("PA")  # no file format writes PA; Pillow makes it in memory
    np.testing.assert_array_equal(to_rgb_array(with_alpha), np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("content", [b"", b"definitely not an image", None])
def test_bad_files_raise_a_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # a truncated JPEG: valid header, missing data
        buffer = tmp_path / "good.jpg"
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, quality=95)
        content = buffer.read_bytes()[:400]
    path.write_bytes(content)
    for read in (to_rgb_array, read_image, image_to_tensor):
        with pytest.raises(DataError, match="bad.jpg"):
            read(path)


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


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FcnsegError, match="not found"):
        to_rgb_array(tmp_path / "nope.png")
    with pytest.raises(FcnsegError, match="folder"):
        to_rgb_array(tmp_path)


def test_arrays_and_tensors():
    np.testing.assert_array_equal(to_rgb_array(_chw(RGB)), RGB)
    np.testing.assert_array_equal(to_rgb_array(_chw(RGB).float() / 255), RGB)
    np.testing.assert_array_equal(to_rgb_array(RGB[..., 0])[..., 2], RGB[..., 0])
    with pytest.raises(ValueError, match="shape"):
        to_rgb_array(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_array(torch.zeros(1, 3, 4, 4))


def test_image_to_tensor_keeps_floats_and_scales_the_rest():
    floats = RNG.random((5, 7, 3)).astype(np.float32)
    assert torch.equal(image_to_tensor(floats), _chw(floats))  # no rounding to 8 bits
    assert torch.equal(image_to_tensor(_chw(floats)), _chw(floats))
    assert torch.equal(image_to_tensor(RGB), _chw(RGB).float() / 255)
    assert image_to_tensor(floats[..., 0]).shape == (3, 5, 7)
    with pytest.raises(ValueError, match="shape"):
        image_to_tensor(np.zeros((4, 4, 2), np.float32))


def test_list_images_filters_by_extension(tmp_path):
    for name in ("b.JPG", "a.png", "notes.txt", "c.tiff"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.tiff"]


# --- EXIF orientation ---------------------------------------------------------------------------


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _phone_photo(path, orientation: int = 6):
    """A 16x32 (HxW) picture stored sideways: top half white, bottom half black, tagged to turn."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:8] = 255
    Image.fromarray(stored).save(path, exif=_exif(orientation), quality=95)
    return path


def test_jpeg_with_exif_orientation_is_read_upright(tmp_path):
    path = _phone_photo(tmp_path / "phone.jpg")  # orientation 6: shown turned 90 degrees clockwise
    image = read_image(path)
    assert image.shape == (3, 32, 16)
    # The stored top (white) is the shown right side.
    assert image[:, :, 10:].float().mean() > 240 and image[:, :, :6].float().mean() < 15
    assert image_size(path) == (32, 16)  # from the header alone, as read_image sees it
    assert to_rgb_array(path).shape == (32, 16, 3) and image_to_tensor(path).shape == (3, 32, 16)


@pytest.mark.parametrize("orientation, upright", [(1, (16, 32)), (3, (16, 32)), (5, (32, 16)), (8, (32, 16))])
def test_image_size_agrees_with_the_reader_for_each_orientation(tmp_path, orientation, upright):
    path = _phone_photo(tmp_path / f"o{orientation}.jpg", orientation)
    assert image_size(path) == upright == tuple(read_image(path).shape[-2:])


def test_png_orientation_is_applied_and_seen_by_image_size(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "r.png", exif=_exif(8))  # shown turned 90 degrees counter-clockwise
    np.testing.assert_array_equal(to_rgb_array(tmp_path / "r.png"), np.rot90(RGB))
    assert image_size(tmp_path / "r.png") == (7, 5)


def test_mask_with_orientation_tag_is_read_upright(tmp_path):
    ids = np.zeros((4, 6), np.uint8)
    ids[:2] = 1
    Image.fromarray(ids, "L").save(tmp_path / "m.png", exif=_exif(6))
    mask = read_mask(tmp_path / "m.png", num_classes=2)
    assert mask.tolist() == np.rot90(ids, k=-1).tolist() and image_size(tmp_path / "m.png") == (6, 4)


def test_dataset_pairs_a_phone_photo_with_its_upright_mask(tmp_path):
    from fcnseg.data import build_dataset
    from fcnseg.data.samplers import image_sizes

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _phone_photo(tmp_path / "images" / "p.jpg")
    upright = np.zeros((32, 16), np.uint8)
    upright[:, 8:] = 1  # the right half, where the stored top half is shown
    Image.fromarray(upright, "L").save(tmp_path / "masks" / "p.png")
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    dataset = build_dataset("folder", tmp_path, "all")
    image, mask = dataset[0]
    assert image.shape == (3, 32, 16) and torch.equal(mask, torch.from_numpy(upright).long())
    assert image[:, mask == 1].float().mean() > 240  # the photo's white half is where the mask says
    assert image_sizes(dataset) == [(32, 16)]  # batching by size sees the upright size too


def test_mask_of_the_stored_pixels_is_a_clear_size_error(tmp_path):
    photo = _phone_photo(tmp_path / "p.jpg")
    Image.fromarray(np.zeros((16, 32), np.uint8), "L").save(tmp_path / "m.png")  # the stored, sideways size
    with pytest.raises(DataError, match=r"m.png: mask is 16x32 .* is 32x16; .*EXIF orientation"):
        check_same_size(read_image(photo), read_mask(tmp_path / "m.png", num_classes=2), photo, tmp_path / "m.png")


# --- masks: one policy ----------------------------------------------------------------------------


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
    with pytest.raises(DataError, match=r"c2.png: colour \(1, 2, 3\) at row 0, column 2 .*repaint"):
        read_mask(tmp_path / "c2.png", num_classes=3, colors=colors)


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
    rgb[ids == 255] = (9, 9, 9)  # the void colour
    Image.fromarray(rgb).save(tmp_path / "c.png")
    for name in ("p.png", "l.png", "c.png"):
        mask = read_mask(tmp_path / name, num_classes=3, colors=colors, void_colors=[(9, 9, 9)])
        np.testing.assert_array_equal(mask.numpy(), ids.astype(np.int64), err_msg=name)
    # A colour that is neither a class nor void is an error (the former prediction reader read it as void).
    with pytest.raises(DataError, match=r"c.png: colour \(9, 9, 9\) at row 1, column 0 is not a class colour"):
        read_mask(tmp_path / "c.png", num_classes=3, colors=colors)
    with pytest.raises(DataError, match="colour"):
        read_mask(tmp_path / "c.png", num_classes=3)


def test_rgb_mask_without_colours(tmp_path):
    gray = np.array([[0, 1, 2]], dtype=np.uint8)
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "g.png")
    assert read_mask(tmp_path / "g.png", num_classes=3).tolist() == [[0, 1, 2]]
    Image.fromarray(np.array([[[0, 1, 2]]], dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: colour"):
        read_mask(tmp_path / "rgb.png", num_classes=3)


def test_size_mismatch_names_both_files(tmp_path):
    with pytest.raises(DataError, match=r"m.png: mask is 4x5 \(HxW\) but its image .*i.jpg is 4x6$"):
        check_same_size(torch.zeros(3, 4, 6), torch.zeros(4, 5), tmp_path / "i.jpg", tmp_path / "m.png")


# --- broken links -----------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symbolic links")
def test_broken_and_looping_links_are_named_in_one_warning(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "c.png").symlink_to(tmp_path / "c.png")  # a link to itself: a loop
    (tmp_path / "d.png").symlink_to(tmp_path / "a.png")  # a good link is listed
    (tmp_path / ".hidden.png").symlink_to(tmp_path / "gone.png")
    with pytest.warns(UserWarning) as record:
        found = list_images(tmp_path)
    assert [p.name for p in found] == ["a.png", "d.png"]
    assert [str(w.message) for w in record] == [f"2 broken or looping symbolic links in {tmp_path} skipped: b.jpg, c.png"]
