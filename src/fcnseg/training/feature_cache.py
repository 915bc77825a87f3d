"""Frozen-backbone training on cached features: the body runs once per image and view, not per step.

With ``--freeze-backbone`` the body's weights and BatchNorm statistics never change, so neither do
the features it computes for a given input. The chapter's common trick follows: compute them once,
store them, and train only the head (score layers and upsamplers) on the stored features. The body
is about 95% of the FCN's FLOPs, and in a frozen run it does nothing but recompute the same
features every epoch.

**Fixed augmented views, not augmentation in feature space.** Augmentation has to happen before
the body. Applying it to cached features instead (crop the feature map on the stride-32 grid, flip
it) would be cheaper, but it is not what the full model computes:

- a horizontal flip does not commute with the body: its learned kernels are not mirror-symmetric,
  so ``body(flip(x)) != flip(body(x))``;
- a crop commutes only far from the crop's edges: each stride-32 feature of ResNet-18 sees a
  receptive field of several hundred pixels, so features near the edge of a crop were computed
  from pixels outside it, and miss the zero padding the body sees at a real image edge;
- random scaling has no feature-space counterpart at all.

So the cache stores ``V`` fixed views of every image: view ``v`` of image ``i`` is exactly the
sample the uncached run draws in epoch ``v`` (the training set's augmentation is seeded by
``(seed, epoch, index)``, see `fcnseg.data.samplers`), and epoch ``e`` of a cached run trains on view
``e mod V``. For the first ``V`` epochs a cached run therefore sees the very inputs of an uncached
frozen run, up to the float16 rounding of the stored features; after that it cycles through them.
The price is ``V`` body passes in all (instead of one per epoch) and ``V`` times the storage.

**Storage.** The head reads ``c32`` (FCN-32s), plus ``c16`` (16s), plus ``c8`` (8s); only those are
kept, packed into one tensor on the stride-32 grid (``c16`` and ``c8`` by space-to-depth, an exact
rearrangement, `fcnseg.training.cached_head`), so a cached sample is an ordinary 4-D "image" the training step handles like any
other. Per 320x480 view that is 150 KB (32s), 450 KB (16s) or 1 MB (8s) in float16, plus a 150 KB
uint8 target. The cache lives in memory, or with a directory in memory-mapped ``.npy`` files that a
later run with the same images, augmentation, views and backbone reopens instead of rebuilding.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fcnseg.errors import DataError, FcnsegError
from fcnseg.models.fcn import FCN, OUTPUT_STRIDE, pad_to_multiple
from fcnseg.runtime import free_memory_bytes
from fcnseg.training.cached_head import CachedFeatureHead, pack_features, packed_channels

FORMAT_VERSION = 1
_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
_META = "meta.json"


class FeatureCache:
    """Packed body features and targets of ``V`` augmented views of every image of a dataset.

    Build with `FeatureCache.build`. ``features`` is ``(V, N, C_packed, H/32, W/32)`` (float16 or
    float32) and ``targets`` ``(V, N, H, W)`` (uint8, 255 = void), as tensors in memory or as
    read-only ``numpy`` memmaps in ``directory``.
    """

    def __init__(self, features: Any, targets: Any, size: tuple[int, int], directory: Path | None = None) -> None:
        self.features = features
        self.targets = targets
        self.size = (int(size[0]), int(size[1]))
        self.directory = directory

    @property
    def num_views(self) -> int:
        return int(self.features.shape[0])

    def __len__(self) -> int:
        return int(self.features.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + self.targets.nbytes)

    def sample(self, view: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed features (C_packed, H/32, W/32), target (H, W) int64)`` of one view of one image."""
        packed, target = self.features[view, index], self.targets[view, index]
        if isinstance(packed, np.ndarray):  # a memmap row: copy it out of the read-only mapping
            packed, target = torch.from_numpy(np.array(packed)), torch.from_numpy(np.array(target))
        return packed, target.long()

    def dataset(self) -> "CachedViews":
        """The training set as seen through the cache (``set_epoch`` picks the view)."""
        return CachedViews(self)

    @classmethod
    def build(
        cls,
        model: FCN,
        views: Dataset,
        num_views: int,
        *,
        directory: str | os.PathLike | None = None,
        dtype: str = "float16",
        batch_size: int = 8,
        workers: int = 0,
        channels_last: bool = False,
        progress: bool = False,
    ) -> "FeatureCache":
        """Runs the frozen body once over ``num_views`` views of every image and keeps the features.

        Args:
            model: an FCN built with ``freeze_backbone=True``; its body runs in eval mode under
                ``torch.inference_mode`` on the model's device.
            views: the training set, with ``set_epoch(epoch)`` choosing its random augmentation
                (`fcnseg.data.samplers.SeededTransformDataset`); view ``v`` is what it yields in epoch ``v``.
                Every sample must have the same size (the training crop).
            num_views: V, at least 1.
            directory: keep the cache in memory-mapped files here; a complete cache of the same
                images, augmentation, views, storage type and backbone weights is reopened, not rebuilt.
                None keeps it in memory.
            dtype: storage type of the features, "float16" (half the memory) or "float32" (exact).
            batch_size: images per body pass.
            workers: DataLoader workers that decode and augment.
            channels_last: run the body in channels-last layout (faster with oneDNN).
            progress: show a progress bar.

        Raises:
            ValueError: the body is not frozen, or bad arguments.
            DataError: samples of different sizes.
            FcnsegError: the cache would not fit in memory (use a directory), or float16 overflowed.
        """
        _check_build_arguments(model, num_views, dtype)
        fingerprint = cache_fingerprint(model, views, num_views, dtype)
        folder = Path(directory) if directory is not None else None
        if folder is not None:
            reopened = cls.open(folder, fingerprint)
            if reopened is not None:
                return reopened

        first_image, _ = _view(views, 0)[0]
        height, width = first_image.shape[-2:]
        size = (int(height), int(width))
        grid = (math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE))
        channels = packed_channels(model.backbone.channels, model.variant)
        storage = _CacheStorage(folder, (num_views, len(views), channels, *grid), _DTYPES[dtype],
                                (num_views, len(views), height, width),
                                torch.uint8 if model.num_classes <= 255 else torch.int16)
        batches = _body_passes(model, views, num_views, size, dtype=dtype, batch_size=batch_size, workers=workers,
                               channels_last=channels_last, progress=progress)
        for view, start, packed, target in batches:
            storage.write(view, start, packed, target)
        return storage.finish(size, fingerprint)

    @classmethod
    def open(cls, directory: str | os.PathLike, fingerprint: str | None = None) -> "FeatureCache | None":
        """Reopens a complete cache in ``directory`` (read-only memmaps), or None if there is none
        or its fingerprint differs from ``fingerprint``."""
        folder = Path(directory)
        try:
            meta = json.loads((folder / _META).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format_version") != FORMAT_VERSION or (fingerprint is not None and meta.get("fingerprint") != fingerprint):
            return None
        features = np.load(folder / "features.npy", mmap_mode="r")
        targets = np.load(folder / "targets.npy", mmap_mode="r")
        return cls(features, targets, tuple(meta["size"]), directory=folder)


class CachedViews(Dataset):
    """A `FeatureCache` as a training set: item ``i`` in epoch ``e`` is view ``e mod V`` of image ``i``.

    Items are ``(packed features, target)``: the packed features take the place of the image, and
    `CachedFeatureHead` takes the place of the model.
    """

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self.view = 0

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.cache.num_views

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.sample(self.view, index)


def cached_head_training(model: FCN, train_set: Dataset, config: Any, device: torch.device, ctx: Any = None,
                         *, progress: bool = True) -> tuple[nn.Module, CachedViews]:
    """Builds the cache for a training run and returns what the loop trains instead.

    Args:
        model: the frozen-backbone FCN, on ``device``.
        train_set: the augmented training set (`fcnseg.data.samplers.SeededTransformDataset`).
        config: the run's `fcnseg.training.config.TrainConfig` (``cache_features`` views, ``feature_cache``
            directory, ``batch_size``, ``workers``, ``channels_last``).
        device: the training device.
        ctx: the `fcnseg.training.distributed.DistributedContext`; under DDP the returned module is wrapped
            in DistributedDataParallel, and with a cache directory rank 0 builds it while the
            other ranks wait and then reopen it.
        progress: show a progress bar while caching (rank 0 only).

    Returns:
        ``(module, dataset)``: the module maps a batch of the dataset's inputs to logits; pass them
        to the training step in place of the model and the training set.
    """
    from fcnseg.training.distributed import barrier

    distributed = ctx is not None and ctx.enabled
    is_main = ctx is None or ctx.is_main

    def build() -> FeatureCache:
        return FeatureCache.build(model, train_set, config.cache_features, directory=config.feature_cache,
                                  batch_size=config.batch_size, workers=config.workers,
                                  channels_last=config.channels_last, progress=progress and is_main)

    if distributed and config.feature_cache:
        cache = build() if ctx.is_main else None
        barrier(ctx)
        if cache is None:
            cache = build()  # finds rank 0's complete cache by its fingerprint
    else:
        cache = build()
    if is_main:
        where = f"in {cache.directory}" if cache.directory else "in memory"
        print(f"cached {cache.num_views} view(s) of {len(cache)} images ({cache.nbytes / 2**20:.0f} MiB {where}); "
              "training the head on them")
    head: nn.Module = CachedFeatureHead(model, cache.size)
    if distributed:
        head = nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
    return head, cache.dataset()


def cache_fingerprint(model: FCN, views: Dataset, num_views: int, dtype: str) -> str:
    """A digest of what a cache's contents depend on: backbone weights, variant, views, storage."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    base = getattr(views, "dataset", views)
    description = {
        "format_version": FORMAT_VERSION,
        "variant": model.variant,
        # A body's stride-8/16/32 channels, as caches made before FCN-4s recorded them (and its
        # stride-4, stride-2 taps for 4s, 2s): the finer taps change nothing a 32s/16s/8s cache
        # holds, so those caches stay valid.
        "channels": list(model.backbone.channels[-{"4s": 4, "2s": 5}.get(model.variant, 3):]),
        "num_views": num_views,
        "dtype": dtype,
        "dataset": type(base).__name__,
        "length": len(views),
        "paths": [str(p) for p in getattr(base, "image_paths", [])],
        "seed": getattr(views, "seed", None),
        "transforms": repr(getattr(views, "transforms", None)),
    }
    digest.update(json.dumps(description, sort_keys=True).encode())
    return digest.hexdigest()


class _CacheStorage:
    """The arrays a cache is built into: tensors in memory, or tensors over memory-mapped ``.npy`` files.

    One code path writes both (a memmap seen through ``torch.from_numpy`` is a tensor like any
    other); only where the arrays live and how a finished cache is handed over differ.
    """

    def __init__(self, folder: Path | None, feature_shape: tuple[int, ...], feature_dtype: torch.dtype,
                 target_shape: tuple[int, ...], target_dtype: torch.dtype) -> None:
        self.folder = folder
        self.maps: tuple[np.memmap, ...] = ()
        if folder is None:
            _check_fits_in_memory(math.prod(feature_shape) * feature_dtype.itemsize
                                  + math.prod(target_shape) * target_dtype.itemsize)
            self.features = torch.empty(feature_shape, dtype=feature_dtype)
            self.targets = torch.empty(target_shape, dtype=target_dtype)
            return
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _META).unlink(missing_ok=True)  # incomplete until meta.json is written again
        self.maps = tuple(
            np.lib.format.open_memmap(folder / name, mode="w+", dtype=_numpy_dtype(dtype), shape=shape)
            for name, dtype, shape in (("features.npy", feature_dtype, feature_shape),
                                       ("targets.npy", target_dtype, target_shape)))
        self.features, self.targets = (torch.from_numpy(array) for array in self.maps)

    def write(self, view: int, start: int, packed: torch.Tensor, target: torch.Tensor) -> None:
        """Stores one batch of packed features and targets of view ``view`` from image ``start`` on."""
        stop = start + packed.shape[0]
        self.features[view, start:stop] = packed
        self.targets[view, start:stop] = target.to(self.targets.dtype)

    def finish(self, size: tuple[int, int], fingerprint: str) -> FeatureCache:
        """The complete cache: in memory as it is; on disk flushed, marked complete and reopened read-only."""
        if self.folder is None:
            return FeatureCache(self.features, self.targets, size)
        for array in self.maps:
            array.flush()
        self.features = self.targets = None
        self.maps = ()
        meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "size": list(size)}
        tmp = self.folder / f".{_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.folder / _META)  # written last: its presence marks a complete cache
        cache = FeatureCache.open(self.folder, fingerprint)
        assert cache is not None
        return cache


def _body_passes(model: FCN, views: Dataset, num_views: int, size: tuple[int, int], *, dtype: str, batch_size: int,
                 workers: int, channels_last: bool, progress: bool,
                 ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Runs the body over every view: ``(view, first image, packed features on the CPU, targets)`` per batch."""
    from fcnseg.progress import progress_bar

    device = next(model.parameters()).device
    bar = progress_bar(total=num_views * len(views), desc="caching features", unit="img", disable=not progress)
    for v in range(num_views):
        loader = DataLoader(_view(views, v), batch_size=batch_size, shuffle=False, num_workers=workers)
        start = 0
        for image, target in loader:
            if tuple(image.shape[-2:]) != size:
                raise DataError(
                    f"cached views must all have one size (the training crop): got {tuple(image.shape[-2:])} "
                    f"after {size}"
                )
            packed = _body_features(model, image.to(device), channels_last).to("cpu", _DTYPES[dtype])
            if not bool(torch.isfinite(packed).all()):
                raise FcnsegError(f"body features overflow {dtype}; cache them as float32")
            yield v, start, packed, target
            start += image.shape[0]
            bar.update(image.shape[0])
    bar.close()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (float16, float32, uint8, int16)."""
    return torch.empty((), dtype=dtype).numpy().dtype


def _check_build_arguments(model: FCN, num_views: int, dtype: str) -> None:
    """Refuses a cache that cannot be built: an unfrozen body, no views, or an unknown storage type."""
    if not getattr(model, "freeze_backbone", False):
        raise ValueError("features can be cached only for a frozen backbone (freeze_backbone=True)")
    if num_views < 1:
        raise ValueError(f"num_views must be at least 1, got {num_views}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def _view(views: Dataset, view: int) -> Dataset:
    """The training set as it is in epoch ``view``, without touching the caller's epoch."""
    clone = copy.copy(views)
    if hasattr(clone, "set_epoch"):
        clone.set_epoch(view)
    return clone


def _body_features(model: FCN, image: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The packed features of one batch, the body in eval mode (its BatchNorm statistics are frozen too)."""
    image = pad_to_multiple(image, OUTPUT_STRIDE)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    was_training = model.backbone.training
    model.backbone.eval()
    try:
        with torch.inference_mode():
            return pack_features(model.backbone(image), model.variant).contiguous()
    finally:
        model.backbone.train(was_training)


def _check_fits_in_memory(needed: int) -> None:
    """Refuses an in-memory cache of ``needed`` bytes that would crowd out the free memory (60% at most)."""
    available = free_memory_bytes()
    if available is not None and needed > 0.6 * available:
        raise FcnsegError(
            f"the feature cache needs {needed / 2**30:.1f} GiB, more than fits in the {available / 2**30:.1f} GiB of "
            "free memory: give it a directory (--feature-cache DIR), cache fewer views, or use a smaller crop"
        )


__all__ = ["CachedViews", "FeatureCache", "cache_fingerprint", "cached_head_training"]
