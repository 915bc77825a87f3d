"""The pixel cap of the one reader: checked from the header, before decoding; raised, lowered and
removed; carried to child processes."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from fcnseg.constants import MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV
from fcnseg.data.io import (
    image_size,
    image_to_tensor,
    max_image_pixels,
    open_image,
    read_image,
    read_mask,
    set_max_image_pixels,
    to_rgb_array,
)
from fcnseg.errors import DataError, OptionError
from tests.data.helpers import header_only_png

RNG = np.random.default_rng(0)


@pytest.fixture
def default_cap(monkeypatch):
    """The default cap for the test, and the environment and Pillow's limit as they were afterwards."""
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "")  # empty: the default; and restored afterwards, unlike delenv of an unset name
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


# 10^10 pixels: Pillow's own check refuses it inside Image.open; 144 MP: only fcnseg's cap refuses it.
@pytest.mark.parametrize("width,height,shown", [(100_000, 100_000, "10,000,000,000 pixels"),
                                                (12_000, 12_000, "12000x12000 \\(WxH\\) = 144,000,000 pixels")])
def test_an_image_above_the_cap_is_refused_from_its_header(tmp_path, default_cap, width, height, shown):
    path = header_only_png(tmp_path / "bomb.png", width, height)
    assert path.stat().st_size < 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's own, between its limit and twice it
        for read in (image_size, open_image, read_image, to_rgb_array, image_to_tensor,
                     lambda p: read_mask(p, num_classes=3)):
            with pytest.raises(DataError, match=rf"bomb.png: the image is {shown}, above the cap of 89,478,485 pixels.*"
                                                r"refused before decoding.*--max-pixels N") as raised:
                read(path)
            assert str(raised.value).count("bomb.png") == 1


def test_a_48_megapixel_photo_is_under_the_cap(tmp_path, default_cap):
    assert max_image_pixels() == MAX_IMAGE_PIXELS
    assert image_size(header_only_png(tmp_path / "phone.png", 8000, 6000)) == (6000, 8000)
    # The header passed the cap, so open_image decodes, and finds the data missing: a different error.
    with pytest.raises(DataError, match="phone.png: cannot decode image"):
        open_image(tmp_path / "phone.png")


def test_the_cap_can_be_raised_lowered_and_removed(tmp_path, default_cap):
    bomb = header_only_png(tmp_path / "bomb.png", 12_000, 12_000)
    huge = header_only_png(tmp_path / "huge.png", 100_000, 100_000)
    set_max_image_pixels(200_000_000)
    assert max_image_pixels() == 200_000_000 and os.environ[MAX_IMAGE_PIXELS_ENV] == "200000000"
    assert Image.MAX_IMAGE_PIXELS >= 200_000_000  # Pillow's check does not refuse what the cap admits
    assert image_size(bomb) == (12_000, 12_000)
    with pytest.raises(DataError, match="huge.png: .* above the cap of 200,000,000 pixels"):
        image_size(huge)
    set_max_image_pixels(None)
    assert max_image_pixels() is None and Image.MAX_IMAGE_PIXELS is None
    assert image_size(huge) == (100_000, 100_000)
    set_max_image_pixels(0)
    assert max_image_pixels() is None
    small = tmp_path / "small.png"
    Image.fromarray(RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(small)
    set_max_image_pixels(599)
    with pytest.raises(DataError, match=r"small.png: the image is 30x20 \(WxH\) = 600 pixels, above the cap of 599"):
        read_image(small)
    set_max_image_pixels(600)
    assert read_image(small).shape == (3, 20, 30)


def test_bad_caps_are_option_errors(default_cap, monkeypatch):
    for bad in (-1, 1.5, "100", True):
        with pytest.raises(OptionError, match="pixel cap"):
            set_max_image_pixels(bad)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(OptionError, match=f"{MAX_IMAGE_PIXELS_ENV}='lots'"):
        max_image_pixels()
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1_000")
    assert max_image_pixels() == 1000


def test_the_cap_reaches_child_processes(tmp_path, default_cap):
    """A DataLoader worker is a child process (spawned ones import fcnseg afresh): the cap must reach it."""
    huge = header_only_png(tmp_path / "huge.png", 100_000, 100_000)
    set_max_image_pixels(None)
    # The child starts with Pillow's default limit, whose check refuses 10^10 pixels inside
    # Image.open: it reads the cap from the environment and raises Pillow's limit too.
    script = ("import sys\nfrom PIL import Image\nprint(Image.MAX_IMAGE_PIXELS)\n"
              "from fcnseg.data.io import image_size\nprint(image_size(sys.argv[1]))")
    child = subprocess.run([sys.executable, "-c", script, str(huge)], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split("\n")[:2] == ["89478485", "(100000, 100000)"]
