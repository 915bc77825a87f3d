"""Copy-paste augmentation: cutouts of chosen classes pasted onto other training pairs, checked against
numpy, clipped to the image, repeatable under the per-sample seed, and refused for unknown classes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fcnseg.data.copy_paste import CopyPaste, collect_cutouts, parse_classes
from fcnseg.data.samplers import SeededTransformDataset
from fcnseg.errors import OptionError

CLASSES = ["ground", "pole", "sign"]


def pair(seed: int, size: tuple[int, int] = (12, 16), poles: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """A random photo, ground everywhere, a void corner, and 1-pixel poles (class 1) in the given columns."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.integers(0, 256, (3, *size), dtype=np.uint8))
    target = torch.zeros(size, dtype=torch.int64)
    target[:2, :2] = 255
    for column in poles:
        target[3:, column] = 1
    target[0, -1] = 2  # one sign pixel
    return image, target


def identity(image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image, target


def test_class_names_become_ids_and_unknown_names_are_refused():
    assert parse_classes("pole", CLASSES) == [1]
    assert parse_classes(" sign , pole ", CLASSES) == [1, 2]
    with pytest.raises(OptionError, match=r"'Pole' is not a class of this dataset; its classes are ground, pole, sign"):
        parse_classes("Pole", CLASSES)
    with pytest.raises(OptionError, match="one or more class names"):
        parse_classes(" , ", CLASSES)


def test_cutouts_hold_exactly_the_chosen_pixels_of_pairs_that_have_them():
    pairs = [pair(0, poles=(3, 4)), pair(1), pair(2, poles=(10,))]
    for pairs_item in pairs[1:2]:
        pairs_item[1][0, -1] = 0  # the middle pair has no sign either
    cutouts = collect_cutouts(pairs, [1, 2])
    assert len(cutouts) == 2
    for cutout, (image, target) in zip(cutouts, [pairs[0], pairs[2]]):
        chosen = (target == 1) | (target == 2)
        rows, cols = np.nonzero(chosen.numpy())
        assert sorted(zip(cutout.rows.tolist(), cutout.cols.tolist())) == sorted(zip(rows.tolist(), cols.tolist()))
        got = {(r, c): (tuple(v), lab) for r, c, v, lab in zip(cutout.rows.tolist(), cutout.cols.tolist(),
                                                              cutout.colours.T.tolist(), cutout.labels.tolist())}
        for r, c in zip(rows.tolist(), cols.tolist()):
            assert got[(r, c)] == (tuple(image[:, r, c].tolist()), int(target[r, c]))


def expected_paste(image, target, donor_image, donor_target, shift):
    """The paste computed with numpy: donor pole pixels moved ``shift`` columns, clipped to the image."""
    out_image, out_target = image.numpy().copy(), target.numpy().copy()
    for r, c in zip(*np.nonzero(donor_target.numpy() == 1)):
        if 0 <= c + shift < out_target.shape[1] and r < out_target.shape[0]:
            out_image[:, r, c + shift] = donor_image.numpy()[:, r, c]
            out_target[r, c + shift] = 1
    return out_image, out_target


@pytest.mark.parametrize("max_shift", [0.0, 0.25, 1.0])
def test_a_paste_equals_numpys_at_one_shift_in_range_and_leaves_the_inputs_alone(max_shift):
    donor = pair(5, poles=(1, 7, 15))
    cutouts = collect_cutouts([donor], [1])
    paste = CopyPaste(cutouts, 1.0, identity, max_shift=max_shift)
    image, target = pair(9)
    before = image.clone(), target.clone()
    shifts_seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        got_image, got_target = paste(image, target)
        reach = int(max_shift * 16)
        matches = [s for s in range(-reach, reach + 1)
                   if all(np.array_equal(g.numpy(), e) for g, e in
                          zip((got_image, got_target), expected_paste(image, target, *donor, s)))]
        assert matches, f"seed {seed}: the paste matches no shift in [-{reach}, {reach}]"
        shifts_seen.update(matches)
    assert torch.equal(image, before[0]) and torch.equal(target, before[1])
    assert len(shifts_seen) > (1 if max_shift else 0)  # shifts are drawn, within the range


def test_a_donor_larger_than_the_image_is_clipped_and_probability_zero_pastes_nothing():
    donor = pair(3, size=(20, 30), poles=(2, 25))
    cutouts = collect_cutouts([donor], [1])
    image, target = pair(4, size=(12, 16))
    torch.manual_seed(0)
    got_image, got_target = CopyPaste(cutouts, 1.0, identity, max_shift=0.0)(image, target)
    expected = expected_paste(image, target, *donor, 0)
    assert np.array_equal(got_image.numpy(), expected[0]) and np.array_equal(got_target.numpy(), expected[1])
    assert got_target[3:, 2].eq(1).all() and got_target.shape == (12, 16)
    kept = CopyPaste(cutouts, 0.0, identity)(image, target)
    assert kept[0] is image and kept[1] is target


def test_then_receives_the_pasted_pair_and_samples_repeat_under_the_seed():
    pairs = [pair(i, poles=(i + 1,)) for i in range(4)]
    received = []

    def then(image, target):
        received.append(int((target == 1).sum()))
        return image, target

    paste = CopyPaste(collect_cutouts(pairs, [1]), 1.0, then)
    first = SeededTransformDataset(pairs, paste, seed=3)
    second = SeededTransformDataset(pairs, paste, seed=3)
    for index in range(4):
        a, b = first[index], second[index]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert max(received) > 9  # a pasted pole beside the pair's own (9 pixels each)
    first.set_epoch(1)
    assert any(not torch.equal(first[i][1], second[i][1]) for i in range(4))
    assert "CopyPaste(classes=[]" in repr(paste) and "cutouts=4" in repr(paste)
