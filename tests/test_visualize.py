"""Colour masks, overlays, palette PNGs and figures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.visualize import (
    colorize,
    legend_image,
    overlay,
    palette_image,
    plot_confusion_matrix,
    plot_curves,
    save_palette_png,
    save_prediction_grid,
)

CLASSES = ["background", "cat", "dog"]
COLORS = [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
LABEL = np.array([[0, 1, 2], [2, 255, 1]])


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_colorize_is_label2image():
    out = colorize(LABEL, COLORS)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    expected = np.array([[COLORS[0], COLORS[1], COLORS[2]], [COLORS[2], (0, 0, 0), COLORS[1]]], dtype=np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_colorize_accepts_tensors_and_a_void_colour():
    np.testing.assert_array_equal(colorize(torch.from_numpy(LABEL), COLORS), colorize(LABEL, COLORS))
    out = colorize(torch.tensor([[255, 7, -1]]), COLORS, ignore_color=(255, 255, 255))
    np.testing.assert_array_equal(out, [[[255, 255, 255]] * 3])  # void, unknown id, negative id


def test_overlay_blends_and_keeps_void_pixels():
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    np.testing.assert_array_equal(overlay(image, LABEL, COLORS, alpha=0.0), image)
    full = overlay(image, LABEL, COLORS, alpha=1.0)
    np.testing.assert_array_equal(full[0], colorize(LABEL, COLORS)[0])
    np.testing.assert_array_equal(full[1, 1], [100, 100, 100])  # void shows the photo
    half = overlay(torch.from_numpy(image).permute(2, 0, 1), LABEL, COLORS)
    np.testing.assert_array_equal(half[0, 1], [114, 50, 50])  # (100 + 128) / 2 rounded, (100 + 0) / 2
    with pytest.raises(ValueError, match="label"):
        overlay(image, LABEL[:1], COLORS)


def test_palette_png_reads_back_as_the_indices(tmp_path):
    label = np.random.default_rng(0).integers(0, 3, (37, 41))
    label[0, :5] = 255
    path = save_palette_png(torch.from_numpy(label), COLORS, tmp_path / "sub" / "mask.png")
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), label)
        palette = np.asarray(image.getpalette()[: 3 * 3]).reshape(3, 3)
    np.testing.assert_array_equal(palette, COLORS)
    np.testing.assert_array_equal(_png(path), colorize(label, COLORS))  # viewers show the class colours
    with pytest.raises(ValueError, match="0..255"):
        palette_image(np.array([[256]]), COLORS)


def test_legend_image():
    image = legend_image(CLASSES, COLORS)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert (image == 128).any()  # the cat swatch is drawn


def test_prediction_grid_with_and_without_ground_truth(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    pred = np.random.default_rng(1).integers(0, 3, (20, 30))
    rows = [(image, pred, pred), (torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(pred), None)]
    path = save_prediction_grid(rows, CLASSES, COLORS, tmp_path / "grid.png")
    assert path == tmp_path / "grid.png" and _png(path).shape[0] > 100
    only_pred = save_prediction_grid([(image, pred, None)], CLASSES, COLORS, tmp_path / "two.png",
                                     titles=("photo", "FCN"))
    assert _png(only_pred).shape[1] < _png(path).shape[1]  # two columns, not three
    with pytest.raises(ValueError):
        save_prediction_grid([], CLASSES, COLORS, tmp_path / "none.png")


def test_plot_curves_with_missing_keys(tmp_path):
    records = [
        {"epoch": 1, "iteration": 50, "train_loss": 1.2, "lr": 0.01},
        {"epoch": 2, "iteration": 100, "train_loss": 0.9, "val_loss": 1.0, "pixel_acc": 0.7, "miou": 0.4, "lr": 0.005},
        {"epoch": 3, "iteration": 150, "train_loss": 0.7, "val_loss": None, "pixel_acc": 0.75, "miou": float("nan")},
    ]
    assert _png(plot_curves(records, tmp_path / "curves.png")).shape[1] > 400
    assert _png(plot_curves([{"train_loss": 1.0}, {"miou": 0.1}], tmp_path / "no_x.png")).size
    assert _png(plot_curves([], tmp_path / "empty.png")).size


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix(tmp_path, normalize):
    cm = np.array([[50, 2, 0], [5, 10, 0], [0, 0, 0]])  # the last class never occurs
    path = plot_confusion_matrix(cm, CLASSES, tmp_path / f"cm_{normalize}.png", normalize=normalize)
    assert _png(path).shape[0] > 200
    plot_confusion_matrix(torch.from_numpy(cm), CLASSES, tmp_path / "t.png")
    with pytest.raises(ValueError, match="matrix"):
        plot_confusion_matrix(cm[:2], CLASSES, tmp_path / "bad.png")
