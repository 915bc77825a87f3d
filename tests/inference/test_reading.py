"""The reading side of bulk prediction: photos normalised by table look-up exactly as
`Segmenter.preprocess` normalises them, and close to the formula computed in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.constants import IMAGENET_MEAN, IMAGENET_STD
from fcnseg.inference.reading import ImageFiles, PixelNormaliser
from fcnseg.inference.segmenter import Segmenter

CLASSES, COLORS = ["a", "b", "c"], [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.25, 0.0), (0.5, 0.3, 1.0))])
def test_normaliser_equals_preprocess_bit_for_bit(model, mean, std):
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    photo.reshape(-1, 3)[:256] = np.arange(256, dtype=np.uint8)[:, None]  # every value in every channel
    segmenter = Segmenter(model, CLASSES, COLORS, mean=mean, std=std, device="cpu", backend="torch")
    got = PixelNormaliser(mean, std)(photo)
    assert got.dtype == torch.float32 and got.shape == (3, 33, 47) and got.is_contiguous()
    assert torch.equal(got, segmenter.preprocess(photo))
    expected = (photo.transpose(2, 0, 1) / 255.0 - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_image_files_give_the_segmenters_input(model, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", backend="torch")
    item = ImageFiles([path], mean=segmenter.mean.flatten().tolist(), std=segmenter.std.flatten().tolist())[0]
    assert item.error is None
    assert torch.equal(item.input, segmenter.preprocess(path))
    assert torch.equal(item.image, torch.from_numpy(np.asarray(Image.open(path))))
