"""Split files and the holdout of a training split (runs of consecutive items, or whole groups)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcnseg.data.splits import group_holdout_split, group_names, holdout_split, read_split_file, training_listing
from fcnseg.errors import DataError, OptionError


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


def test_group_names_are_the_regex_match_or_its_first_group():
    names = ["0016E5_08061", "0001TP_006690", "Seq05VD_f00000"]
    assert group_names(names, "^[^_]+") == ["0016E5", "0001TP", "Seq05VD"]
    assert group_names(names, r"_(\D*)\d") == ["", "", "f"]
    with pytest.raises(OptionError, match=r"--holdout-groups '\(' is not a regular expression"):
        group_names(names, "(")
    with pytest.raises(OptionError, match="does not match the image '0001TP_006690'"):
        group_names(names, "E5")


def closest_subsets(sizes: dict[str, int], fraction: float) -> list[set[str]]:
    """Every set of whole groups (not none, not all) whose total is closest to the target, fewest items on ties."""
    total = sum(sizes.values())
    subsets = [set(c) for r in range(1, len(sizes)) for c in itertools.combinations(sizes, r)]
    key = lambda c: (abs(sum(sizes[g] for g in c) - fraction * total), sum(sizes[g] for g in c))  # noqa: E731
    best = min(key(c) for c in subsets)
    return [c for c in subsets if key(c) == best]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=2, max_size=7), st.floats(0.01, 0.99))
def test_whole_groups_closest_to_the_fraction_are_held_out(group_sizes, fraction):
    sizes = {f"g{i}": n for i, n in enumerate(group_sizes)}
    groups = [g for g, n in sizes.items() for _ in range(n)]
    groups = groups[1::2] + groups[::2]  # groups need not be contiguous
    kept, held = group_holdout_split(groups, fraction)
    assert sorted(kept + held) == list(range(len(groups))) and kept and held
    held_groups = {groups[i] for i in held}
    assert not held_groups & {groups[i] for i in kept}  # whole groups only
    assert held_groups in closest_subsets(sizes, fraction)
    assert group_holdout_split(groups, fraction) == (kept, held)  # the same every time


def test_camvids_sequences_and_a_single_group():
    groups = ["0001TP"] * 62 + ["0006R0"] * 101 + ["0016E5"] * 204
    assert {groups[i] for i in group_holdout_split(groups, 0.2)[1]} == {"0001TP"}
    assert {groups[i] for i in group_holdout_split(groups, 0.3)[1]} == {"0006R0"}
    with pytest.raises(DataError, match="at least 2 groups; every image is in group 'a'"):
        group_holdout_split(["a"] * 5, 0.2)
    with pytest.raises(DataError, match="between 0 and 1"):
        group_holdout_split(groups, 1.0)


def test_a_drop_small_run_lists_only_images_at_least_its_crop():
    assert training_listing(True, [320, 480]) == {"drop_smaller_than": (320, 480)}
    assert training_listing(False, [320, 480]) == {} and training_listing(True, None) == {}
