"""The data of a training run: a holdout of the training split replaces the validation split."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcnseg.data import build_dataset
from fcnseg.data.splits import holdout_split
from fcnseg.training.config import TrainConfig
from fcnseg.training.datasets import build_training_data


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from fcnseg.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path_factory.mktemp("scenes") / "data", num_classes=3, n=10, size=(40, 56), seed=1,
                          progress=False)
    (root / "val.txt").write_text("no_such_image\n")  # reading the val split would fail
    return root


def test_a_holdout_validates_on_held_out_training_images_and_never_reads_val(scenes):
    config = TrainConfig(dataset="folder", root=str(scenes), holdout=0.3, workers=0).validate()
    data = build_training_data(config)
    everything = build_dataset("folder", str(scenes), "train")
    kept, held = holdout_split(len(everything), 0.3)
    assert len(held) == round(len(everything) * 0.3) >= 2
    assert len(data.raw_train) == len(kept) and len(data.val) == len(held)
    assert data.classes == list(everything.classes)
    mean = torch.tensor(config_mean()).view(3, 1, 1)
    for position, index in enumerate(held):
        image, target = data.val[position]
        raw_image, raw_target = everything[index]
        assert torch.equal(target, raw_target)  # the held-out image itself, whole
        assert image.shape[-2:] == raw_image.shape[-2:] and not torch.allclose(image, mean.expand_as(image))
    for position, index in enumerate(kept):
        assert torch.equal(data.raw_train[position][1], everything[index][1])
    assert data.val_image_sizes() == [tuple(everything[i][0].shape[-2:]) for i in held]


def config_mean() -> list[float]:
    from fcnseg.constants import IMAGENET_MEAN

    return list(IMAGENET_MEAN)


def test_without_a_holdout_the_val_split_is_read(scenes):
    from fcnseg.errors import DataError

    config = TrainConfig(dataset="folder", root=str(scenes), workers=0).validate()
    with pytest.raises(DataError, match="no_such_image"):
        build_training_data(config)


@pytest.mark.parametrize("value", [-0.1, 1.0, 2])
def test_a_holdout_outside_0_1_is_refused(value):
    from fcnseg.errors import OptionError

    with pytest.raises(OptionError, match="holdout must be a fraction"):
        TrainConfig(holdout=value).validate()


def test_copy_paste_pastes_training_pixels_only_and_unknown_classes_are_a_usage_error(scenes):
    from fcnseg.data.copy_paste import CopyPaste
    from fcnseg.errors import OptionError

    config = TrainConfig(dataset="folder", root=str(scenes), holdout=0.3, workers=0, copy_paste="striped disc",
                         copy_paste_prob=1.0, crop=(32, 32)).validate()
    data = build_training_data(config)
    paste = data.train.transforms
    assert isinstance(paste, CopyPaste) and paste.classes == ["striped disc"] and paste.probability == 1.0
    kept_with_disc = [i for i in range(len(data.raw_train)) if (data.raw_train[i][1] == 1).any()]
    assert len(paste.cutouts) == len(kept_with_disc) >= 1  # cut from the images trained on, not the holdout
    image, target = data.train[0]
    assert image.shape[-2:] == target.shape == (32, 32)
    wrong = TrainConfig(dataset="folder", root=str(scenes), holdout=0.3, workers=0, copy_paste="pole").validate()
    with pytest.raises(OptionError, match="--copy-paste: 'pole' is not a class"):
        build_training_data(wrong)
    with pytest.raises(OptionError, match="copy_paste_prob"):
        TrainConfig(copy_paste_prob=1.5).validate()


def test_a_group_holdout_validates_on_whole_groups_never_trained_on(scenes):
    from fcnseg.errors import OptionError

    # the synthetic scenes are named 00000 ... 00009: one group per last digit
    config = TrainConfig(dataset="folder", root=str(scenes), holdout=0.5, holdout_groups=r"\d$",
                         workers=0).validate()
    data = build_training_data(config)
    everything = build_dataset("folder", str(scenes), "train")
    stems = [p.stem for p in everything.image_paths]
    groups = [stem[-1] for stem in stems]
    held = {groups[i] for i in range(len(stems)) if any(torch.equal(everything[i][1], data.val[j][1])
                                                        for j in range(len(data.val)))}
    kept = {groups[i] for i in data.raw_train.indices}
    assert held and kept and not held & kept
    assert len(data.val) + len(data.raw_train) == len(everything)
    with pytest.raises(OptionError, match="does not match the image"):
        build_training_data(TrainConfig(dataset="folder", root=str(scenes), holdout=0.5, holdout_groups="^x",
                                        workers=0).validate())
    with pytest.raises(OptionError, match="give --holdout F too"):
        TrainConfig(holdout_groups="^x").validate()


def test_copy_paste_of_a_class_no_training_image_holds_is_refused():
    from fcnseg.errors import DataError

    class Pairs(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]

        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            target = torch.zeros(40, 56, dtype=torch.int64)
            target[:, :10] = 1  # classes a and b only, never c
            return torch.zeros(3, 40, 56, dtype=torch.uint8), target

    config = TrainConfig(dataset="folder", holdout=0.5, workers=0, copy_paste="c", crop=(32, 32)).validate()
    with pytest.raises(DataError, match="--copy-paste c: no training image holds a pixel of c; nothing to paste"):
        build_training_data(config, train_dataset=Pairs())
