"""The data of a training run: named datasets or the user's own, with their transforms and class names.

Either way the loop receives the same things: an augmented training set whose random transforms are
seeded by (seed, epoch, index), so a resumed run sees the batches an unbroken one would, and a
validation set of whole, normalised images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset

from fcnseg.data.samplers import SeededTransformDataset, image_sizes
from fcnseg.data.splits import image_groups
from fcnseg.errors import DataError
from fcnseg.training.config import TrainConfig

PairTransform = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass
class TrainingData:
    """What the trainer trains and validates on.

    Attributes:
        raw_train: the training pairs before any transform (class weights read its masks).
        train: ``raw_train`` under the seeded random training transforms.
        val: the validation pairs, transformed.
        classes: the class names; label i is ``classes[i]``.
        colors: one RGB colour per class, saved in checkpoints for palette PNGs.
        val_size_source: a dataset whose images have the sizes of ``val``'s (the cheapest to read).
        raw_val: the validation pairs before any transform when they are not the named dataset's
            validation split (the user's, or the holdout of ``config.holdout``); None otherwise.
    """

    raw_train: Dataset
    train: SeededTransformDataset
    val: Dataset
    classes: list[str]
    colors: list[list[int]]
    val_size_source: Dataset
    raw_val: Dataset | None = None

    def val_image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every validation image, to batch equal sizes together."""
        return image_sizes(self.val_size_source)


def build_training_data(config: TrainConfig, *, train_dataset: Dataset | None = None,
                        val_dataset: Dataset | None = None, train_transforms: PairTransform | None = None,
                        val_transforms: PairTransform | None = None, progress: bool = False) -> TrainingData:
    """The run's data: the user's datasets where given, else ``config.dataset`` at ``config.root``.

    Args:
        config: the run's settings (crop, augmentation, seed, ``max_val_images``; the dataset name,
            root, splits, ``drop_small`` and ``border_as_background`` for named datasets).
        train_dataset: raw ``(image uint8 (3, H, W), target int64 (H, W))`` pairs with ``classes``
            (and optionally ``colors``); None: the named dataset's training split.
        val_dataset: raw pairs for validation; None: the named dataset's validation split (with
            ``config.holdout``, the held-out part of the training pairs instead).
        train_transforms: paired ``transforms(image, target)`` for training; None: the config's
            augmentation (`fcnseg.data.train_transforms`, or the d2l recipe's crop).
        val_transforms: paired transforms for validation; None: `fcnseg.data.eval_transforms`.

    Raises:
        FcnsegError: a user dataset without ``classes``, datasets whose classes disagree, or a named
            dataset needed without ``config.root``.
    """
    from fcnseg.data.transforms import eval_transforms

    raw_train = train_dataset if train_dataset is not None else _named_train(config)
    classes, colors = _classes_and_colors(raw_train)
    groups = image_groups(raw_train, config.holdout_groups) if config.holdout_groups else None
    if config.cache_images:
        from fcnseg.data.memory import InMemoryPairs

        raw_train = InMemoryPairs(raw_train, progress=progress)
    if config.holdout:
        raw_train, val_dataset = held_out_pairs(raw_train, config.holdout, groups)
    transforms = train_transforms or _default_train_transforms(config)
    if config.copy_paste:
        transforms = _with_copy_paste(config, raw_train, classes, transforms)
    train = SeededTransformDataset(raw_train, transforms, config.seed)
    if val_dataset is None:
        val = size_source = _named_val(config, val_transforms or eval_transforms())
    else:
        _check_same_classes(val_dataset, classes)
        raw_val = _first(val_dataset, config.max_val_images)
        # Eval transforms keep each image's size: read the sizes from the raw pairs (or their files).
        val = SeededTransformDataset(raw_val, val_transforms or eval_transforms(), config.seed)
        size_source = raw_val if val_transforms is None else val
    return TrainingData(raw_train, train, val, classes, colors, size_source, val_dataset)


def held_out_pairs(pairs: Dataset, fraction: float, groups: list[str] | None = None) -> tuple[Subset, Subset]:
    """``(kept, held_out)`` views of ``pairs`` (`fcnseg.data.splits.holdout_split`, or with ``groups``,
    one group name per pair, `fcnseg.data.splits.group_holdout_split`), both carrying its ``classes``
    and ``colors``: the training pairs of a run that validates on a holdout, and that holdout."""
    from fcnseg.data.splits import group_holdout_split, holdout_split

    kept, held = group_holdout_split(groups, fraction) if groups else holdout_split(len(pairs), fraction)
    parts = (Subset(pairs, kept), Subset(pairs, held))
    for part in parts:
        for name in ("classes", "colors"):
            if getattr(pairs, name, None) is not None:
                setattr(part, name, getattr(pairs, name))
    return parts


def holdout_message(config: TrainConfig, data: TrainingData) -> str:
    """What a run with ``config.holdout`` validates and trains on, printed at its start."""
    whole = f", whole groups of --holdout-groups {config.holdout_groups!r}" if config.holdout_groups else ""
    return (f"validating on {len(data.val)} images held out of the training split ({config.holdout:g}{whole}), "
            f"not on {config.val_split!r}; training on {len(data.raw_train)}")


def _named_options(config: TrainConfig) -> dict[str, Any]:
    _require_root(config)
    options: dict[str, Any] = {}
    if config.border_as_background and config.dataset == "voc2012":
        options["border_as_background"] = True  # only VOC has a border class to re-read
    return options


def _named_train(config: TrainConfig) -> Dataset:
    from fcnseg.data import build_dataset
    from fcnseg.data.splits import training_listing

    options = {**_named_options(config), **training_listing(config.drop_small, config.crop)}
    return build_dataset(config.dataset, config.root, config.train_split, transforms=None, **options)


def _named_val(config: TrainConfig, transforms: PairTransform) -> Dataset:
    from fcnseg.data import build_dataset

    val = build_dataset(config.dataset, config.root, config.val_split, transforms=transforms, **_named_options(config))
    return _first(val, config.max_val_images)


def _first(dataset: Dataset, count: int | None) -> Dataset:
    """The first ``count`` items (all when ``count`` is None or 0)."""
    if not count:
        return dataset
    return Subset(dataset, range(min(len(dataset), count)))


def _default_train_transforms(config: TrainConfig) -> PairTransform:
    from fcnseg.data.transforms import d2l_transforms, train_transforms

    if config.recipe.startswith("d2l"):
        return d2l_transforms(crop_size=tuple(config.crop))
    return train_transforms(
        crop_size=tuple(config.crop),
        scale_range=tuple(config.scale_range) if config.scale_range else None,
        hflip=config.hflip,
        color_jitter=config.color_jitter,
        hue_jitter=config.hue_jitter,
    )


def _with_copy_paste(config: TrainConfig, pairs: Dataset, classes: list[str], then: PairTransform) -> PairTransform:
    """``then`` after pasting ``config.copy_paste``'s classes from the training pairs (`fcnseg.data.copy_paste`)."""
    from fcnseg.data.copy_paste import CopyPaste, collect_cutouts, parse_classes

    class_ids = parse_classes(config.copy_paste, classes)
    cutouts = collect_cutouts(pairs, class_ids)
    if not cutouts:
        raise DataError(f"--copy-paste {config.copy_paste}: no training image holds a pixel of "
                        f"{', '.join(classes[i] for i in class_ids)}; nothing to paste")
    return CopyPaste(cutouts, config.copy_paste_prob, then, classes=[classes[i] for i in class_ids])


def build_test_crops(config: TrainConfig, val_dataset: Dataset | None = None) -> Dataset:
    """The chapter's test set: random ``config.crop`` crops of the validation images, those smaller than
    the crop left out (its ``VOCSegDataset`` on the val split), the border read as in training.

    The crops are seeded by ``config.seed`` and the epoch (``set_epoch``; epoch 0 until set), so test
    accuracy is repeatable and, as the chapter's, measured on new crops each epoch.
    ``config.max_val_images`` limits the images kept.

    Args:
        val_dataset: the user's raw validation pairs; None: the named dataset's ``config.val_split``.
    """
    from fcnseg.data import build_dataset
    from fcnseg.data.transforms import d2l_transforms

    crop = tuple(config.crop)
    if val_dataset is None:
        raw = build_dataset(config.dataset, config.root, config.val_split, transforms=None,
                            drop_smaller_than=crop, **_named_options(config))
    else:
        sizes = image_sizes(val_dataset)
        raw = Subset(val_dataset, [i for i, (h, w) in enumerate(sizes) if h >= crop[0] and w >= crop[1]])
        raw.dropped = [str(i) for i, (h, w) in enumerate(sizes) if h < crop[0] or w < crop[1]]
    crops = SeededTransformDataset(_first(raw, config.max_val_images), d2l_transforms(crop_size=crop), config.seed)
    crops.set_epoch(0)
    crops.dropped = list(getattr(raw, "dropped", []))
    return crops


def _require_root(config: TrainConfig) -> None:
    if not config.root:
        raise DataError(f"no dataset root: set config.root to read the {config.dataset!r} dataset, or pass "
                        "train_dataset= and val_dataset= to train()")


def _classes_and_colors(dataset: Dataset) -> tuple[list[str], list[list[int]]]:
    from fcnseg.data import default_palette

    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise DataError(f"the training dataset ({type(dataset).__name__}) has no `classes` attribute: give it the "
                        "list of class names, label i named classes[i] (and optionally `colors`, one RGB per class)")
    classes = [str(name) for name in classes]
    colors = getattr(dataset, "colors", None)
    colors = [list(c) for c in (colors if colors is not None else default_palette(len(classes)))]
    if len(colors) != len(classes):
        raise DataError(f"the training dataset has {len(classes)} classes but {len(colors)} colors")
    return classes, colors


def _check_same_classes(val_dataset: Dataset, classes: list[str]) -> None:
    val_classes = getattr(val_dataset, "classes", None)
    if val_classes is not None and [str(name) for name in val_classes] != classes:
        raise DataError(f"the validation dataset's classes {list(val_classes)} differ from the training "
                        f"dataset's {classes}")
