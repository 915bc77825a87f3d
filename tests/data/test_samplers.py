"""Samplers for repeatable, resumable loading: orders by (seed, epoch), rank shards, mid-epoch starts,
per-sample augmentation seeds, equal-size evaluation batches, image sizes from file headers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Subset

from fcnseg.data.samplers import (
    ResumableSampler,
    SeededTransformDataset,
    image_sizes,
    sample_seed,
    size_grouped_batches,
)


def _order(length: int, seed: int, epoch: int, **kwargs) -> list[int]:
    sampler = ResumableSampler(length, seed=seed, **kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


# --- ResumableSampler ------------------------------------------------------------------------------


def test_order_depends_only_on_seed_and_epoch():
    first = _order(50, seed=7, epoch=3)
    assert sorted(first) == list(range(50))  # a permutation
    assert first != list(range(50))  # shuffled
    # another instance, after other epochs were drawn, gives the same order
    sampler = ResumableSampler(50, seed=7)
    for epoch in (0, 5, 3):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
    assert drawn == first
    torch.manual_seed(123)  # the global RNG plays no part
    assert _order(50, seed=7, epoch=3) == first


def test_order_changes_across_epochs_and_seeds():
    orders = {tuple(_order(50, seed=7, epoch=e)) for e in range(5)}
    assert len(orders) == 5
    assert _order(50, seed=8, epoch=3) != _order(50, seed=7, epoch=3)


@pytest.mark.parametrize("length,world_size", [(12, 3), (10, 3), (7, 2), (5, 4), (2, 4)])
def test_ranks_take_disjoint_covering_shards_padded_from_the_start(length, world_size):
    full = _order(length, seed=1, epoch=2)
    per_rank = -(-length // world_size)
    padded = (full * world_size)[: per_rank * world_size]  # the order, wrapped round to a multiple
    shards = []
    for rank in range(world_size):
        sampler = ResumableSampler(length, seed=1, rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        shard = list(sampler)
        assert len(shard) == len(sampler) == per_rank
        assert shard == padded[rank::world_size]
        shards.append(shard)
    drawn = [i for shard in shards for i in shard]
    assert set(drawn) == set(range(length))  # covering
    assert len(drawn) == per_rank * world_size  # equal shares: only the padding repeats
    if length % world_size == 0:
        assert len(set(drawn)) == length  # disjoint


@pytest.mark.parametrize("length,world_size", [(10, 1), (10, 3), (9, 4)])
def test_unshuffled_shards_equal_torch_distributed_sampler(length, world_size):
    for rank in range(world_size):
        ours = ResumableSampler(length, seed=0, shuffle=False, rank=rank, world_size=world_size)
        theirs = DistributedSampler(range(length), num_replicas=world_size, rank=rank, shuffle=False)
        assert list(ours) == list(theirs)


@pytest.mark.parametrize("start", [0, 1, 4, 9, 10])
def test_a_mid_epoch_start_gives_the_tail_of_the_epoch(start):
    full = _order(30, seed=3, epoch=4, rank=1, world_size=3)
    sampler = ResumableSampler(30, seed=3, rank=1, world_size=3)
    sampler.set_epoch(4, start=start)
    assert list(sampler) == full[start:]
    assert len(sampler) == 10 - start
    sampler.set_epoch(5)  # the next epoch starts from its beginning again
    assert len(sampler) == 10 and list(sampler) == _order(30, seed=3, epoch=5, rank=1, world_size=3)


# --- SeededTransformDataset ------------------------------------------------------------------------


class _Indexed(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int):
        return torch.full((1, 4, 4), float(index)), torch.full((4, 4), index, dtype=torch.int64)


def _noisy(image, target):
    return image + torch.rand(image.shape), target + torch.randint(0, 100, (1,))


def test_a_sample_depends_only_on_seed_epoch_and_index():
    dataset = SeededTransformDataset(_Indexed(), _noisy, seed=11)
    dataset.set_epoch(2)
    reference = [dataset[i] for i in range(6)]
    again = SeededTransformDataset(_Indexed(), _noisy, seed=11)
    again.set_epoch(2)
    torch.manual_seed(999)
    for i in (5, 0, 3, 3, 1, 4, 2):  # another order, repeats, other draws from the global RNG between
        torch.rand(7)
        image, target = again[i]
        assert torch.equal(image, reference[i][0]) and torch.equal(target, reference[i][1])

    # the noise is the one torch draws under the documented per-sample seed
    torch.manual_seed(sample_seed(11, 2, 4))
    expected_image, expected_target = _noisy(*_Indexed()[4])
    assert torch.equal(reference[4][0], expected_image) and torch.equal(reference[4][1], expected_target)

    assert not torch.equal(reference[0][0] - 0, reference[1][0] - 1)  # indices draw different noise
    dataset.set_epoch(3)
    assert not torch.equal(dataset[4][0], reference[4][0])  # epochs draw different noise
    other_seed = SeededTransformDataset(_Indexed(), _noisy, seed=12)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[4][0], reference[4][0])
    assert len(dataset) == 6


def test_transforms_leave_the_global_rng_alone():
    dataset = SeededTransformDataset(_Indexed(), _noisy, seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    dataset[2]
    assert torch.equal(torch.rand(3), expected)


def test_sample_seeds_differ_for_neighbouring_inputs():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)


# --- size_grouped_batches --------------------------------------------------------------------------

SIZES = [(40, 50), (30, 30), (40, 50), (40, 50), (30, 30), (64, 64), (40, 50), (40, 50), (30, 30), (40, 50)]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_batches_hold_one_size_each_and_every_index_once(batch_size):
    batches = size_grouped_batches(SIZES, batch_size)
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({SIZES[i] for i in batch}) == 1
        assert batch == sorted(batch)
    drawn = [i for batch in batches for i in batch]
    assert sorted(drawn) == list(range(len(SIZES)))
    # as few batches as the groups allow: ceil(group / batch_size) per size
    groups = {size: SIZES.count(size) for size in set(SIZES)}
    assert len(batches) == sum(-(-n // batch_size) for n in groups.values())


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_are_disjoint_and_covering(world_size):
    everything = size_grouped_batches(SIZES, 2)
    shares = [size_grouped_batches(SIZES, 2, rank=r, world_size=world_size) for r in range(world_size)]
    drawn = [i for share in shares for batch in share for i in batch]
    assert sorted(drawn) == list(range(len(SIZES)))
    assert sorted(map(tuple, (b for share in shares for b in share))) == sorted(map(tuple, everything))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


# --- image_sizes -----------------------------------------------------------------------------------


class _Files(Dataset):
    """Lists its files; reading a sample is an error, so sizes must come from the headers."""

    def __init__(self, paths) -> None:
        self.image_paths = paths

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index):
        raise AssertionError("image_sizes decoded a sample instead of reading its header")


@pytest.fixture
def files(tmp_path):
    sizes = [(20, 30), (31, 17), (8, 8), (45, 60)]  # (H, W)
    paths = []
    for k, (h, w) in enumerate(sizes):
        path = tmp_path / f"{k}.{'png' if k % 2 else 'jpg'}"
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths, sizes


def test_image_sizes_come_from_file_headers(files):
    paths, sizes = files
    assert [tuple(s) for s in image_sizes(_Files(paths))] == sizes


def test_image_sizes_of_a_subset_follow_its_indices(files):
    paths, sizes = files
    subset = Subset(_Files(paths), [3, 0, 2])
    assert [tuple(s) for s in image_sizes(subset)] == [sizes[3], sizes[0], sizes[2]]


def test_image_sizes_without_file_lists_read_the_samples():
    class Tensors(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index):
            return torch.zeros(3, 10 + index, 20 - index), torch.zeros(10 + index, 20 - index)

    assert [tuple(s) for s in image_sizes(Tensors())] == [(10, 20), (11, 19), (12, 18)]
    assert [tuple(s) for s in image_sizes(Subset(Tensors(), [2, 0]))] == [(12, 18), (10, 20)]
