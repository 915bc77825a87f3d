"""DataLoaders that make training repeatable and resumable mid-epoch, across workers and ranks.

Two things make a killed run resume to the same weights as an uninterrupted one: the order of
samples in an epoch depends only on (seed, epoch), and the random augmentation of a sample depends
only on (seed, epoch, index), never on which worker or process drew it or on what ran before.
torch's DistributedSampler cannot start in the middle of an epoch, hence `ResumableSampler`.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from fcnseg.data.io import image_size


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, mixed so nearby inputs give unrelated seeds."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


class SeededTransformDataset(Dataset):
    """Applies a random paired transform under an RNG seeded by (seed, epoch, index).

    The dataset must be built with ``transforms=None``; `set_epoch` is called by the sampler's
    owner before each epoch (and carried into worker processes, which are re-created each epoch).
    """

    def __init__(self, dataset: Dataset, transforms, seed: int) -> None:
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transforms(image, target)


class ResumableSampler(Sampler[int]):
    """Shuffled (or sequential) indices for one rank, reproducible per epoch, startable mid-epoch.

    Like DistributedSampler: the permutation depends on (seed, epoch); it is padded to a multiple of
    the world size and rank ``r`` takes every ``world_size``-th index. ``set_epoch(epoch, start)``
    skips the first ``start`` indices of this rank, for resuming.
    """

    def __init__(self, length: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def size_grouped_batches(sizes: Sequence[tuple[int, int]], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Batches of indices whose images share one size, this rank's share of them.

    Whole-image evaluation batches only equal sizes: padding a smaller image to its batch's size
    would change its logits near the bottom and right borders.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(index)
    batches = [idx[i : i + batch_size] for idx in groups.values() for i in range(0, len(idx), batch_size)]
    batches.sort(key=lambda b: b[0])
    return batches[rank::world_size]


def image_sizes(dataset) -> list[tuple[int, int]]:
    """(H, W) of every image, from file headers when the dataset lists its files."""
    base, indices = dataset, None
    if isinstance(dataset, torch.utils.data.Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    paths = getattr(base, "image_paths", None)
    if paths is None:
        return [tuple(dataset[i][0].shape[-2:]) for i in range(len(dataset))]
    if indices is not None:
        paths = [paths[i] for i in indices]
    return [image_size(path) for path in paths]
