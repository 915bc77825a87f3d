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
rearrangement), so a cached sample is an ordinary 4-D "image" the training step handles like any
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
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fcnseg.errors import DataError, FcnsegError
from fcnseg.models.fcn import FCN, OUTPUT_STRIDE, pad_to_multiple

FORMAT_VERSION = 1
# Which of (c8, c16, c32) each variant's head reads, and the space-to-depth factor of each tap.
_HEAD_TAPS: dict[str, tuple[int, ...]] = {"32s": (2,), "16s": (1, 2), "8s": (0, 1, 2)}
_TAP_FACTORS = (4, 2, 1)
_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
_META = "meta.json"


def packed_channels(channels: Sequence[int], variant: str) -> int:
    """Channels of the packed features of a body with ``channels`` (at strides 8, 16, 32)."""
    return sum(channels[k] * _TAP_FACTORS[k] ** 2 for k in _HEAD_TAPS[variant])


def pack_features(features: Sequence[torch.Tensor], variant: str) -> torch.Tensor:
    """The body features a variant's head reads, as one tensor on the stride-32 grid.

    Args:
        features: ``(c8, c16, c32)`` at the padded input size (multiples of 32).
        variant: "32s", "16s" or "8s".

    Returns:
        ``(N, packed_channels, H/32, W/32)``: ``c32``, preceded by ``c16`` and ``c8`` rearranged by
        ``F.pixel_unshuffle`` when the head reads them.
    """
    parts = [F.pixel_unshuffle(features[k], _TAP_FACTORS[k]) if _TAP_FACTORS[k] > 1 else features[k]
             for k in _HEAD_TAPS[variant]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def unpack_features(
    packed: torch.Tensor, channels: Sequence[int], variant: str
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Inverse of `pack_features`: ``(c8, c16, c32)``, None for taps the head does not read."""
    taps = _HEAD_TAPS[variant]
    parts = packed.split([channels[k] * _TAP_FACTORS[k] ** 2 for k in taps], 1)
    out: list[torch.Tensor | None] = [None, None, None]
    for k, part in zip(taps, parts):
        out[k] = F.pixel_shuffle(part, _TAP_FACTORS[k]) if _TAP_FACTORS[k] > 1 else part
    return out[0], out[1], out[2]  # type: ignore[return-value]


class CachedFeatureHead(nn.Module):
    """An FCN's head on packed cached features: ``forward(packed) -> logits`` of the view's size.

    It holds the model, so training it trains the model's score layers and upsamplers in place, and
    the model is what checkpoints save.

    Args:
        model: the FCN whose body produced the features.
        size: ``(H, W)`` of the views; the head's logits (at the padded size) are cropped to it,
            as ``FCN.forward`` crops.
    """

    def __init__(self, model: FCN, size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = (int(size[0]), int(size[1]))

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        """Args: packed ``(N, C_packed, H/32, W/32)``, any float dtype. Returns: ``(N, C, H, W)``."""
        c8, c16, c32 = unpack_features(packed.float(), self.model.backbone.channels, self.model.variant)
        h, w = self.size
        return self.model.head(c8, c16, c32)[..., :h, :w]

    def loss(self, packed: torch.Tensor, target: torch.Tensor, *, class_weights: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """``segmentation_loss(self(packed), target)``, with the final upsampling and the loss fused.

        Once the body is cached, the full-resolution logits are most of a step's memory traffic;
        `fcnseg.ops.fused_loss.upsample_cross_entropy` never materialises them (a fixed bilinear
        upsampler, which is cheap, runs unfused).
        """
        from fcnseg.ops.fused_loss import upsample_cross_entropy
        from fcnseg.ops.loss import segmentation_loss

        if not self.model.upsample_final.learnable:
            return segmentation_loss(self(packed), target, class_weights=class_weights, reduction=reduction)
        c8, c16, c32 = unpack_features(packed.float(), self.model.backbone.channels, self.model.variant)
        return upsample_cross_entropy(self.model.scores(c8, c16, c32), self.model.upsample_final, target,
                                      class_weights=class_weights, reduction=reduction)


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
        if not getattr(model, "freeze_backbone", False):
            raise ValueError("features can be cached only for a frozen backbone (freeze_backbone=True)")
        if num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {num_views}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        fingerprint = cache_fingerprint(model, views, num_views, dtype)
        folder = Path(directory) if directory is not None else None
        if folder is not None:
            reopened = cls.open(folder, fingerprint)
            if reopened is not None:
                return reopened

        n = len(views)
        first_image, _ = _view(views, 0)[0]
        height, width = first_image.shape[-2:]
        grid = (math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE))
        channels = packed_channels(model.backbone.channels, model.variant)
        target_dtype = np.uint8 if model.num_classes <= 255 else np.int16
        feature_shape = (num_views, n, channels, *grid)
        target_shape = (num_views, n, height, width)
        needed = math.prod(feature_shape) * _DTYPES[dtype].itemsize + math.prod(target_shape) * np.dtype(target_dtype).itemsize
        if folder is None:
            _check_fits_in_memory(needed)
            features: Any = torch.empty(feature_shape, dtype=_DTYPES[dtype])
            targets: Any = torch.empty(target_shape, dtype=torch.uint8 if target_dtype == np.uint8 else torch.int16)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / _META).unlink(missing_ok=True)  # incomplete until meta.json is written again
            features = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=dtype, shape=feature_shape)
            targets = np.lib.format.open_memmap(folder / "targets.npy", mode="w+", dtype=target_dtype, shape=target_shape)

        from tqdm.auto import tqdm

        device = next(model.parameters()).device
        bar = tqdm(total=num_views * n, desc="caching features", unit="img", disable=not progress, dynamic_ncols=True)
        for v in range(num_views):
            loader = DataLoader(_view(views, v), batch_size=batch_size, shuffle=False, num_workers=workers)
            start = 0
            for image, target in loader:
                if tuple(image.shape[-2:]) != (height, width):
                    raise DataError(
                        f"cached views must all have one size (the training crop): got {tuple(image.shape[-2:])} "
                        f"after {(height, width)}"
                    )
                packed = _body_features(model, image.to(device), channels_last).to("cpu", _DTYPES[dtype])
                if not bool(torch.isfinite(packed).all()):
                    raise FcnsegError(f"body features overflow {dtype}; cache them as float32")
                stop = start + image.shape[0]
                if folder is None:
                    features[v, start:stop] = packed
                    targets[v, start:stop] = target.to(targets.dtype)
                else:
                    features[v, start:stop] = packed.numpy()
                    targets[v, start:stop] = target.numpy().astype(target_dtype)
                start = stop
                bar.update(image.shape[0])
        bar.close()
        if folder is None:
            return cls(features, targets, (height, width))
        features.flush()
        targets.flush()
        del features, targets
        meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "size": [height, width]}
        tmp = folder / f".{_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder / _META)  # written last: its presence marks a complete cache
        cache = cls.open(folder, fingerprint)
        assert cache is not None
        return cache

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
        "channels": list(model.backbone.channels),
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


def _view(views: Dataset, view: int) -> Dataset:
    """The training set as it is in epoch ``view``, without touching the caller's epoch."""
    clone = copy.copy(views)
    if hasattr(clone, "set_epoch"):
        clone.set_epoch(view)
    return clone


def _body_features(model: FCN, image: torch.Tensor, channels_last: bool) -> torch.Tensor:
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
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return
    if needed > 0.6 * available:
        raise FcnsegError(
            f"the feature cache needs {needed / 2**30:.1f} GiB, more than fits in the {available / 2**30:.1f} GiB of "
            "free memory: give it a directory (--feature-cache DIR), cache fewer views, or use a smaller crop"
        )


__all__ = [
    "CachedFeatureHead", "CachedViews", "FeatureCache", "cache_fingerprint", "cached_head_training",
    "pack_features", "packed_channels", "unpack_features",
]
