"""Split files and the holdout of a training split."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcnseg.data.splits import holdout_split, read_split_file
from fcnseg.errors import DataError


def runs(indices: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive integers."""
    out: list[list[int]] = []
    for i in indices:
        if out and i == out[-1][-1] + 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@settings(max_examples=200, deadline=None)
@given(count=st.integers(2, 2000), fraction=st.floats(0.01, 0.99), chunks=st.integers(1, 8))
def test_holdout_partitions_the_split_into_evenly_spread_runs(count, fraction, chunks):
    kept, held = holdout_split(count, fraction, chunks)
    assert sorted(kept + held) == list(range(count))  # a partition: nothing lost, nothing twice
    assert kept == sorted(kept) and held == sorted(held)
    assert len(held) == min(count - 1, max(1, round(count * fraction)))
    assert 1 <= len(runs(held)) <= chunks  # runs of neighbours, not a scatter of single frames
    assert holdout_split(count, fraction, chunks) == (kept, held)  # the same for every call (and seed)


def test_holdout_runs_are_spread_over_the_split():
    kept, held = holdout_split(400, 0.2, chunks=4)
    starts = [run[0] for run in runs(held)]
    # four runs of 20, one in each quarter of the split
    assert [len(run) for run in runs(held)] == [20] * 4
    assert [start // 100 for start in starts] == [0, 1, 2, 3]


@pytest.mark.parametrize(("count", "fraction", "message"), [
    (10, 0.0, "between 0 and 1"), (10, 1.0, "between 0 and 1"), (1, 0.5, "at least 2 training images"),
])
def test_holdout_refuses_what_it_cannot_split(count, fraction, message):
    with pytest.raises(DataError, match=message):
        holdout_split(count, fraction)


def test_split_file_skips_comments_and_blanks(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\ufeffa\n# note\n\n b \n")
    assert read_split_file(path) == ["a", "b"]
    path.write_text("# only a comment\n")
    with pytest.raises(DataError, match="is empty"):
        read_split_file(path)
