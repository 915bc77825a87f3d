"""experiments/pole_objects.py: poles followed through frames drawn by hand, and their recall."""
from __future__ import annotations

import sys

import numpy as np

from tests.conftest import REPO_ROOT  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
from pole_objects import column_runs, follow, table  # noqa: E402


def frame(*poles: tuple[int, int, int]) -> np.ndarray:
    """A 10x30 boolean mask with upright poles given as (first column, width, height from the bottom)."""
    mask = np.zeros((10, 30), dtype=bool)
    for start, width, height in poles:
        mask[10 - height:, start:start + width] = True
    return mask


def test_column_runs_are_the_runs_of_occupied_columns():
    assert column_runs(frame((2, 3, 4), (10, 1, 10), (29, 1, 1))) == [(2, 5), (10, 11), (29, 30)]
    assert column_runs(frame()) == []


def test_a_moving_pole_is_one_object_and_a_far_one_another():
    # pole A drifts right 2 columns a frame; pole B appears in the third frame far from A
    masks = [("S1_001.png", frame((2, 2, 5))), ("S1_002.png", frame((4, 2, 6))),
             ("S1_003.png", frame((6, 2, 7), (25, 1, 3)))]
    tracks = follow(masks, tolerance=1)
    assert [t.frames for t in tracks] == [[0, 1, 2], [2]]
    assert [t.pixels for t in tracks] == [2 * (5 + 6 + 7), 3]


def test_objects_do_not_continue_across_sequences_or_beyond_the_tolerance():
    masks = [("S1_009.png", frame((2, 2, 5))), ("S2_001.png", frame((2, 2, 5)))]
    assert len(follow(masks, tolerance=4)) == 2  # same columns, another sequence
    moved = [("S1_001.png", frame((2, 2, 5))), ("S1_002.png", frame((9, 2, 5)))]
    assert len(follow(moved, tolerance=4)) == 2  # 5 columns between them, tolerance 4
    assert len(follow(moved, tolerance=6)) == 1


def test_recall_counts_predicted_pixels_of_each_object_only():
    masks = [("S1_001.png", frame((2, 2, 5), (20, 1, 4)))]
    predicted = frame((2, 1, 5), (12, 3, 10))  # half of the first pole, plus false poles elsewhere
    tracks = follow(masks, tolerance=1, predictions=[predicted])
    assert [(t.pixels, t.found) for t in tracks] == [(10, 5), (4, 0)]
    assert tracks[0].recall == 0.5
    text = table(tracks, [name for name, _ in masks], rows=5, with_recall=True)
    assert "| 1 | 71.4% | 71.4% | 1 (S1_001 to S1_001) | 2-3 | 50.0% |" in text
    assert "| 2 | 28.6% | 100.0% |" in text
