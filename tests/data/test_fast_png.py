"""libspng for plain 8-bit RGB PNGs: Pillow's pixels bit for bit, used only where they agree, and
every other file (and every broken one) left to Pillow and its messages."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fcnseg.data import fast_png
from fcnseg.data.io import image_size, read_image, to_rgb_array
from fcnseg.errors import DataError
from tests.conftest import require_shared

pytest.importorskip("pyspng")

RNG = np.random.default_rng(3)
ORIENTATION = 0x0112


@pytest.fixture
def decodes(monkeypatch):
    """Counts the files libspng decoded."""
    calls = []
    original = fast_png.pyspng.load

    def counting(data, format=None):
        calls.append(format)
        return original(data, format=format)

    monkeypatch.setattr(fast_png.pyspng, "load", counting)
    return calls


def test_rgb8_png_decodes_by_libspng_as_pillow_does(tmp_path, decodes):
    pixels = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    out = to_rgb_array(path)
    assert decodes == ["RGB"]
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, pixels)
    with Image.open(path) as image:
        np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16"])
def test_other_pngs_are_left_to_pillow(tmp_path, decodes, mode):
    base = Image.fromarray(RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    image = base.convert("L").convert(mode) if mode == "I;16" else base.convert(mode)
    image.save(tmp_path / "x.png")
    out = to_rgb_array(tmp_path / "x.png")
    assert decodes == []
    assert out.shape == (9, 11, 3)


def test_sixteen_bit_rgb_png_is_left_to_pillow(tmp_path, decodes):
    # A 16-bit RGB PNG is mode "RGB" in Pillow, with 16-bit samples: its own scaling applies.
    sixteen = _rgb16_png(tmp_path / "sixteen.png", RNG.integers(0, 65536, (3, 4, 3), dtype=np.uint16))
    with Image.open(sixteen) as image:
        assert image.mode == "RGB" and not fast_png.is_plain_rgb8(image)
        expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(to_rgb_array(sixteen), expected)
    assert decodes == []


def test_rotated_png_is_left_to_pillow(tmp_path, decodes):
    stored = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    out = to_rgb_array(tmp_path / "r.png")
    assert decodes == []
    assert out.shape == (6, 4, 3) and image_size(tmp_path / "r.png") == (6, 4)


def test_camvid_photos_read_as_pillow_reads_them(decodes):
    folder = require_shared("camvid/val")
    for path in sorted(folder.glob("*.png"))[:5]:
        with Image.open(path) as image:
            np.testing.assert_array_equal(to_rgb_array(path), np.asarray(image.convert("RGB")))
    assert decodes == ["RGB"] * 5


def test_truncated_png_is_reported_by_pillow_naming_the_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    assert fast_png.decode_rgb8(path) is None
    with pytest.raises(DataError, match="cut.png.*(corrupt|truncated)"):
        read_image(path)


def test_without_pyspng_pillow_reads_the_same_pixels(tmp_path, monkeypatch):
    pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    monkeypatch.setattr(fast_png, "pyspng", None)
    assert not fast_png.available() and fast_png.decode_rgb8(tmp_path / "a.png") is None
    np.testing.assert_array_equal(to_rgb_array(tmp_path / "a.png"), pixels)


def _rgb16_png(path, pixels: np.ndarray):
    """Writes a 16-bit RGB PNG with the standard library (Pillow cannot write one)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path
