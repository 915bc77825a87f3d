"""Metrics against confusion matrices and values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from fcnseg.metrics import ConfusionMatrix, format_metrics_table, metrics_from_confusion


def test_confusion_matrix_counts_by_hand_with_ignored_pixels():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(cm.matrix, expected)


def test_four_metrics_by_hand():
    # rows truth, cols prediction
    m = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    r = metrics_from_confusion(m)
    assert r.num_pixels == 6
    assert math.isclose(r.pixel_acc, 4 / 6)
    assert math.isclose(r.mean_acc, (1 / 2 + 2 / 2 + 1 / 2) / 3)
    # IoU_0 = 1 / (2 + 2 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 1 / (2 + 1 - 1)
    ious = [1 / 3, 2 / 3, 1 / 2]
    assert r.per_class_iou == pytest.approx(ious)
    assert math.isclose(r.miou, sum(ious) / 3)
    assert math.isclose(r.fwiou, (2 * ious[0] + 2 * ious[1] + 2 * ious[2]) / 6)


def test_absent_classes_are_excluded_not_zero():
    # class 2 never appears in truth nor prediction; class 1 is predicted but absent from truth
    m = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    r = metrics_from_confusion(m)
    assert r.per_class_iou[2] is None and r.absent_classes == [2]
    assert r.per_class_iou[1] == 0.0  # present (predicted) so it counts, as 0
    assert math.isclose(r.miou, (3 / 4 + 0) / 2)
    assert r.per_class_acc[1] is None  # no truth pixels: accuracy undefined
    assert math.isclose(r.mean_acc, 3 / 4)
    table = format_metrics_table(r, ["bg", "cat", "dog"])
    assert "(excluded from means): dog" in table


def test_updates_accumulate_and_match_a_direct_computation():
    torch.manual_seed(0)
    cm = ConfusionMatrix(4)
    direct = torch.zeros(4, 4, dtype=torch.int64)
    for _ in range(3):
        target = torch.randint(0, 4, (2, 5, 7))
        target[0, 0] = 255
        pred = torch.randint(0, 4, (2, 5, 7))
        cm.update(pred, target)
        for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
            if t != 255:
                direct[t, p] += 1
    assert torch.equal(cm.matrix, direct)


def test_bad_labels_are_refused():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target values"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1]))
