"""Window grid and merge, whole and sliding prediction, flip averaging."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fcnseg.errors import OptionError
from fcnseg.inference.windows import (
    check_window,
    count_map,
    default_stride,
    merge_windows,
    predict_sliding,
    predict_whole,
    window_grid,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- window_grid -------------------------------------------------------------------------------


def test_window_grid_by_hand():
    # 67 rows, windows of 32 every 20: 0, 20, then 40 would end past 67, so the last one moves to 35.
    assert window_grid(67, 93, (32, 48), (20, 30)) == [(y, x) for y in (0, 20, 35) for x in (0, 30, 45)]
    assert window_grid(64, 96, (64, 96), (10, 10)) == [(0, 0)]
    assert window_grid(70, 96, (64, 96), (64, 96)) == [(0, 0), (6, 0)]


def test_window_grid_image_smaller_than_window_gives_one_window():
    assert window_grid(10, 20, (320, 480), (213, 320)) == [(0, 0)]
    assert window_grid(1, 1, (320, 480), (213, 320)) == [(0, 0)]
    # smaller along one side only
    assert window_grid(10, 1000, (320, 480), (213, 320)) == [(0, 0), (0, 320), (0, 520)]


def test_window_grid_rejects_gaps_and_bad_sizes():
    with pytest.raises(ValueError, match="skipped"):
        window_grid(100, 100, (10, 10), (11, 10))
    with pytest.raises(ValueError):
        window_grid(0, 100, (10, 10), (5, 5))
    with pytest.raises(ValueError):
        window_grid(100, 100, (10, 10), (0, 5))


@pytest.mark.parametrize("window,stride,message", [
    ((32, 48), (40, 30), "sliding stride 40x30 is larger than the window 32x48: the pixels between windows would be skipped"),
    ((32, 48), (20, 49), "sliding stride 20x49 is larger than the window 32x48"),
    ((0, 48), None, "sliding window must be two positive sides .*got 0x48"),
    ((32, -4), (20, 30), "sliding window must be two positive sides .*got 32x-4"),
    ((32, 48), (0, 30), "sliding stride must be two positive steps .*got 0x30"),
    ((32, 48), (20, -1), "sliding stride must be two positive steps .*got 20x-1"),
])
def test_bad_sliding_geometry_is_an_option_error_naming_it(model, window, stride, message):
    """A usage error (OptionError, exit status 2 in the CLI; still a ValueError), from every entry point."""
    image = torch.zeros(1, 3, 40, 60)
    for call in (lambda: check_window(window, stride), lambda: window_grid(40, 60, window, stride or (1, 1)),
                 lambda: predict_sliding(model, image, window=window, stride=stride)):
        with pytest.raises(OptionError, match=message):
            call()
    assert issubclass(OptionError, ValueError)


def test_a_stride_equal_to_the_window_is_accepted():
    check_window((32, 48), (32, 48))
    check_window((32, 48), None)
    assert window_grid(64, 96, (32, 48), (32, 48)) == [(0, 0), (0, 48), (32, 0), (32, 48)]


def test_default_stride_is_two_thirds_rounded_up():
    assert default_stride((320, 480)) == (214, 320)
    assert default_stride((1, 1)) == (1, 1)


@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 120),
    width=st.integers(1, 120),
    window=st.tuples(st.integers(1, 50), st.integers(1, 50)),
    data=st.data(),
)
def test_window_grid_covers_every_pixel_inside_the_image(height, width, window, data):
    stride = (data.draw(st.integers(1, window[0])), data.draw(st.integers(1, window[1])))
    corners = window_grid(height, width, window, stride)
    h, w = min(window[0], height), min(window[1], width)
    covered = np.zeros((height, width), dtype=int)
    for y, x in corners:
        assert 0 <= y and y + h <= height and 0 <= x and x + w <= width  # never hangs over the edge
        covered[y : y + h, x : x + w] += 1
    assert covered.min() >= 1
    assert len(set(corners)) == len(corners)
    assert corners[0] == (0, 0)
    assert max(y for y, _ in corners) + h == height and max(x for _, x in corners) + w == width


# --- merge_windows -----------------------------------------------------------------------------


def test_merge_windows_averages_overlaps_like_a_hand_built_count_map():
    gen = torch.Generator().manual_seed(0)
    height, width, window = 7, 9, (4, 5)
    corners = window_grid(height, width, window, (2, 3))
    logits = [torch.randn(2, 3, *window, generator=gen) for _ in corners]
    merged = merge_windows(logits, corners, height, width)

    expected = np.zeros((2, 3, height, width))
    for n in range(2):
        for c in range(3):
            for py in range(height):
                for px in range(width):
                    values = [logits[k][n, c, py - y, px - x].item() for k, (y, x) in enumerate(corners)
                              if y <= py < y + window[0] and x <= px < x + window[1]]
                    expected[n, c, py, px] = sum(values) / len(values)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-6, atol=1e-6)

    counts = np.zeros((height, width))
    for y, x in corners:
        counts[y : y + window[0], x : x + window[1]] += 1
    np.testing.assert_array_equal(count_map(corners, window, height, width).numpy(), counts)


def test_merge_windows_unbatched_and_constant_windows():
    corners = [(0, 0), (0, 2), (1, 0), (1, 2)]
    logits = [torch.full((2, 3, 4), float(v)) for v in (1, 2, 4, 8)]
    merged = merge_windows(logits, corners, 4, 6)
    assert merged.shape == (2, 4, 6)
    assert merged[0, 0, 0].item() == 1.0  # window 0 only
    assert merged[0, 0, 2].item() == 1.5  # windows 0 and 1
    assert merged[1, 1, 2].item() == 15 / 4  # all four
    assert merged[0, 3, 0].item() == 4.0 and merged[0, 3, 5].item() == 8.0  # bottom corners: one window each
    with pytest.raises(ValueError, match="uncovered"):
        merge_windows(logits[:1], corners[:1], 4, 6)


# --- predict_whole / predict_sliding -------------------------------------------------------------


@pytest.mark.parametrize("window", [(67, 93), (100, 200)])
def test_sliding_equals_whole_when_one_window_covers_the_image(resnet_model, window):
    image = torch.randn(2, 3, 67, 93)
    whole = predict_whole(resnet_model, image)
    sliding = predict_sliding(resnet_model, image, window=window)
    torch.testing.assert_close(sliding, whole, rtol=0, atol=0)


def test_sliding_equals_merge_of_windows_run_one_by_one(model):
    image = torch.randn(2, 3, 70, 100)
    window, stride = (40, 64), (25, 40)
    sliding = predict_sliding(model, image, window=window, stride=stride, batch_size=3)
    corners = window_grid(70, 100, window, stride)
    with torch.no_grad():
        per_window = [model(image[:, :, y : y + 40, x : x + 64]) for y, x in corners]
    torch.testing.assert_close(sliding, merge_windows(per_window, corners, 70, 100), rtol=1e-5, atol=1e-5)


def test_flip_averages_with_the_mirrored_prediction(model):
    image = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        expected = (model(image) + model(image.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(predict_whole(model, image, flip=True), expected, rtol=1e-5, atol=1e-5)
    sliding = predict_sliding(model, image, window=(64, 96), flip=True)
    torch.testing.assert_close(sliding, expected, rtol=1e-5, atol=1e-5)


def test_autocast_dtype_returns_float32_logits(model):
    image = torch.randn(1, 3, 32, 40)
    logits = predict_whole(model, image, dtype=torch.bfloat16)
    assert logits.dtype == torch.float32 and logits.shape == (1, 3, 32, 40)
    torch.testing.assert_close(logits, predict_whole(model, image), rtol=0.1, atol=0.5)
