"""A phone photo (EXIF orientation) is segmented upright: the label map has the size a viewer shows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg import fcn_resnet18
from fcnseg.data.io import image_size, read_image
from fcnseg.inference import Segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    torch.manual_seed(0)
    model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None)
    return Segmenter(model, ["a", "b", "c"], [(0, 0, 0), (255, 0, 0), (0, 255, 0)], device="cpu")


def test_predict_on_a_rotated_jpeg_returns_the_upright_size(tmp_path, segmenter):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown turned 90 degrees clockwise
    stored = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)

    label = segmenter.predict(tmp_path / "phone.jpg")
    assert label.shape == (64, 40) == image_size(tmp_path / "phone.jpg")
    # The same as predicting the upright pixels the reader gives, passed as an array.
    upright = read_image(tmp_path / "phone.jpg").permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(label, segmenter.predict(upright))
    assert segmenter.predict_proba(str(tmp_path / "phone.jpg")).shape == (3, 64, 40)
