"""Decoded pairs kept in memory: the same pairs as the dataset, decoded once, refused when too large."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import Dataset

from fcnseg.data import FolderDataset, memory
from fcnseg.data.memory import InMemoryPairs
from fcnseg.errors import OptionError
from tests.data.test_folder import make_folder


class CountingPairs(Dataset):
    """Pairs made up on read, counting the reads."""

    classes = ["a", "b"]

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self.mask_values, self.reads = masks, 0

    def __len__(self) -> int:
        return len(self.mask_values)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        mask = self.mask_values[index]
        return torch.full((3, *mask.shape), index, dtype=torch.uint8), mask.clone()


def test_pairs_equal_the_datasets_and_carry_its_description(tmp_path):
    dataset = FolderDataset(make_folder(tmp_path / "d", stems=("a", "b", "c", "d")))
    cached = InMemoryPairs(dataset)
    assert len(cached) == len(dataset)
    assert cached.classes == dataset.classes and cached.colors == dataset.colors
    assert cached.image_paths == dataset.image_paths
    for index in range(len(dataset)):
        (image, mask), (expected_image, expected_mask) = cached[index], dataset[index]
        assert mask.dtype == torch.int64 and image.dtype == torch.uint8
        assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask)


def test_each_pair_is_decoded_once_and_masks_outside_uint8_stay_as_they_are():
    masks = [torch.tensor([[0, 1], [255, 1]]), torch.tensor([[0, 300], [-1, 1]])]
    pairs = CountingPairs(masks)
    cached = InMemoryPairs(pairs)
    for _ in range(3):
        for index in range(2):
            assert torch.equal(cached[index][1], masks[index]) and cached[index][1].dtype == torch.int64
    assert pairs.reads == 2
    assert cached.masks[0].dtype == torch.uint8 and cached.masks[1].dtype == torch.int64


def test_pairs_that_would_not_fit_are_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(memory, "free_memory_bytes", lambda: 100)
    pairs = CountingPairs([torch.zeros(4, 5, dtype=torch.int64)] * 10)
    with pytest.raises(OptionError, match=r"--cache-images: the 10 decoded training images need .* train without"):
        InMemoryPairs(pairs)
    assert pairs.reads == 1  # the first pair, for the estimate


def test_train_refuses_cache_images_that_would_not_fit_with_exit_2(tmp_path, monkeypatch, capsys):
    from fcnseg.cli import main

    root = make_folder(tmp_path / "d", stems=("a", "b", "c", "d"), size=(40, 48))
    monkeypatch.setattr(memory, "free_memory_bytes", lambda: 1000)
    status = main(["train", "--dataset", "folder", "--root", str(root), "--weights-backbone", "none", "--crop", "32x32",
                   "--batch-size", "2", "--epochs", "1", "--workers", "0", "--no-progress", "--cache-images",
                   "--out", str(tmp_path / "run")])
    assert status == 2
    err = capsys.readouterr().err
    assert re.search(r"^fcnseg train: error: --cache-images: the \d+ decoded training images need about .* free memory; "
                     r"train without --cache-images", err, re.M) and "Traceback" not in err
