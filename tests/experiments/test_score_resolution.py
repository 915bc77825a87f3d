"""experiments/score_resolution.py: the oracle of a stride-s score map, on masks drawn by hand."""
from __future__ import annotations

import sys

import torch

from fcnseg.constants import IGNORE_INDEX
from tests.conftest import REPO_ROOT  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
from score_resolution import bound, oracle_prediction  # noqa: E402


def pole_mask(width: int = 1) -> torch.Tensor:
    mask = torch.zeros(16, 24, dtype=torch.int64)
    mask[:, 9:9 + width] = 1  # a vertical "pole" on background 0
    return mask


def test_stride_one_is_exact_and_a_thin_line_vanishes_at_a_coarse_stride():
    mask = pole_mask(1)
    assert torch.equal(oracle_prediction(mask, 2, 1), mask)
    assert not (oracle_prediction(mask, 2, 8) == 1).any()  # 1/8 of each cell: background wins everywhere
    wide = pole_mask(8)
    assert (oracle_prediction(wide, 2, 8) == 1).sum() >= 8 * 16 * 0.75  # a cell-wide pole survives mostly


def test_void_pixels_are_not_counted_as_any_class():
    mask = pole_mask(2)
    mask[:, 11:15] = IGNORE_INDEX  # void beside the pole: the cell's labelled pixels are half pole
    prediction = oracle_prediction(mask, 2, 4)
    assert (prediction[:, 9:11] == 1).all()


class Masks(torch.utils.data.Dataset):
    classes = ["background", "pole"]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = pole_mask(1 + index)
        return torch.zeros(3, *mask.shape, dtype=torch.uint8), mask


def test_bound_falls_with_the_stride_for_the_thin_class():
    ious = {stride: matrix.compute().per_class_iou[1] for stride, matrix in bound(Masks(), [1, 2, 4, 8]).items()}
    assert ious[1] == 1.0 and ious[1] >= ious[2] >= ious[4] >= ious[8] and ious[8] < 0.5
