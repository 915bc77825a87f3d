"""The d2l recipes' metrics against the chapter's own formulas, computed here by hand; its printout and
"read N examples" counts; the MXNet and JAX editions' recipes; the global batch under torchrun."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fcnseg.cli import main
from fcnseg.constants import IMAGENET_MEAN, IMAGENET_STD
from fcnseg.errors import OptionError
from fcnseg.models.checkpoint import load_checkpoint, model_from_checkpoint
from fcnseg.training.config import CHOICES, RECIPES, resolve_config
from fcnseg.training.d2l_metrics import format_chapter_line, init_scores, per_example_loss, per_process_batch
from fcnseg.training.datasets import build_test_crops
from fcnseg.training.step import StepResult
from fcnseg.training.trainer import train

CROP = (64, 96)
CLASSES = ["background", "thing", "other"]


class Pairs(torch.utils.data.Dataset):
    """Random uint8 images and labels 0-2 (no void: the chapter's labels have none) of the given sizes."""

    classes = CLASSES

    def __init__(self, sizes: list[tuple[int, int]], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = [(torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8),
                       torch.randint(0, 3, (h, w), generator=gen)) for h, w in sizes]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _normalised(images: list[torch.Tensor]) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return torch.stack([(image.float() / 255 - mean) / std for image in images])


def _chapter_loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    """d2l's `loss` per example, summed and divided by the examples (train_ch13's metric[0] / metric[2])."""
    per_example = F.cross_entropy(logits, y, reduction="none").mean(1).mean(1)
    return float(per_example.sum() / y.shape[0])


def _chapter_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """d2l's `accuracy` summed over the examples, over all pixels (metric[1] / metric[3])."""
    return float((logits.argmax(1) == y).sum() / y.numel())


def _run(tmp_path: Path, recipe: str, val_sizes: list[tuple[int, int]], **options) -> Path:
    # lr 1e-30: the weights after the one step are bit-for-bit those the step's forward pass used (each
    # update is far below a float32 ulp), so the chapter's metrics can be recomputed from last.pt.
    values = {"root": "unused", "weights_backbone": "none", "crop": CROP, "epochs": 1, "batch_size": 4,
              "lr": 1e-30, "weight_decay": 0.0, "workers": 0, "out": str(tmp_path / recipe), **options}
    config = resolve_config(values, recipe=recipe)
    train(config, train_dataset=Pairs([CROP] * 4, 0), val_dataset=Pairs(val_sizes, 1), progress=False)
    return tmp_path / recipe


@pytest.mark.parametrize("recipe", ["d2l", "d2l-mxnet"])  # the summed ("d2l") and the "mean" loss
def test_train_loss_train_acc_test_acc_are_the_chapters(recipe, tmp_path, capsys):
    # Crop-sized images: the crops are the whole images, known here without the recipe's random crop.
    out = _run(tmp_path, recipe, [CROP] * 3 + [(32, 200), (80, 90)])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    model = model_from_checkpoint(load_checkpoint(out / "last.pt"))
    train_pairs, val_pairs = Pairs([CROP] * 4, 0), Pairs([CROP] * 3, 1)
    x, y = _normalised([p[0] for p in train_pairs]), torch.stack([p[1] for p in train_pairs])
    with torch.no_grad():
        test_logits = model.eval()(_normalised([p[0] for p in val_pairs]))  # before a train-mode pass moves BN stats
        logits = model.train()(x)  # the step's forward: BatchNorm on the batch's statistics (one batch of all 4)
    assert record["train_loss"] == pytest.approx(_chapter_loss(logits, y), rel=1e-5)
    assert record["train_acc"] == pytest.approx(_chapter_accuracy(logits, y), abs=1e-6)
    test_y = torch.stack([p[1] for p in val_pairs])
    assert record["test_acc"] == pytest.approx(_chapter_accuracy(test_logits, test_y), abs=1e-6)
    assert record["examples_per_sec"] > 0 and "miou" in record and "pixel_acc" in record  # standard ones beside
    printed = capsys.readouterr().out
    assert "read 4 examples\n" in printed and "read 3 examples (2 smaller than 64x96 dropped)\n" in printed
    line = re.search(r"epoch 1: loss (\d\.\d{3}), train acc (\d\.\d{3}), test acc (\d\.\d{3}), [\d.]+ examples/sec",
                     printed)
    assert line is not None, printed
    assert float(line.group(1)) == pytest.approx(record["train_loss"], abs=5e-4)


def test_the_d2l_reduction_logs_the_per_example_loss_not_the_batch_sum():
    # 2 micro-batches of 4 images: the step's loss 10.0 is a micro-batch's sum over 4 examples.
    assert per_example_loss(StepResult(loss=10.0, images=8), "d2l", 2).loss == pytest.approx(2.5)
    assert per_example_loss(StepResult(loss=0.7, images=8), "mean", 2).loss == 0.7


def test_test_crops_are_seeded_and_drop_small_images():
    config = resolve_config({"root": "unused", "crop": CROP, "seed": 3}, recipe="d2l")
    val = Pairs([(80, 120)] * 3 + [(60, 200)], 1)
    first, again = build_test_crops(config, val), build_test_crops(config, val)
    assert len(first) == 3 and first.dropped == ["3"]
    for i in range(3):
        assert torch.equal(first[i][0], again[i][0]) and torch.equal(first[i][1], again[i][1])
        assert first[i][1].shape == CROP
    other = build_test_crops(resolve_config({"root": "unused", "crop": CROP, "seed": 4}, recipe="d2l"), val)
    assert any(not torch.equal(first[i][1], other[i][1]) for i in range(3))
    # A new epoch draws new crops (as the chapter's test iterator does), the same for the same epoch.
    first.set_epoch(2)
    again.set_epoch(2)
    assert any(not torch.equal(first[i][1], other[i][1]) for i in range(3))
    assert all(torch.equal(first[i][1], again[i][1]) for i in range(3))
    assert any(not torch.equal(first[i][1], build_test_crops(config, val)[i][1]) for i in range(3))


def _voc_tree(root: Path, sizes: dict[str, tuple[int, int]], splits: dict[str, list[str]]) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "JPEGImages").mkdir()
    (base / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        ids = np.zeros((h, w), dtype=np.uint8)
        ids[h // 2:] = 5
        ids[0] = 255  # the void border
        mask = Image.fromarray(ids, "P")
        mask.putpalette([0] * 768)
        mask.save(base / "SegmentationClass" / f"{name}.png")
    for split, names in splits.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def test_voc_counts_and_border_read_as_the_chapter_reads_it(tmp_path, capsys):
    from fcnseg.training.d2l_metrics import read_message

    root = _voc_tree(tmp_path, {"a": (70, 100), "b": (40, 100), "c": (64, 96), "d": (30, 30)},
                     {"train": ["a", "b"], "val": ["c", "d"]})
    config = resolve_config({"dataset": "voc2012", "root": str(root), "crop": CROP}, recipe="d2l")
    crops = build_test_crops(config, None)
    assert read_message(crops, CROP) == "read 1 examples (1 smaller than 64x96 dropped)"
    target = crops[0][1]
    assert int((target == 255).sum()) == 0 and int((target == 0).sum()) == 32 * 96  # border row is background
    plain = build_test_crops(resolve_config({**config.to_dict(), "border_as_background": False}), None)
    assert int((plain[0][1] == 255).sum()) == 96


def test_the_printed_line_reads_like_the_chapters():
    record = {"train_loss": 0.4261, "train_acc": 0.8672, "test_acc": 0.8514, "examples_per_sec": 37.16}
    assert format_chapter_line(record) == "loss 0.426, train acc 0.867, test acc 0.851, 37.2 examples/sec"


def test_the_editions_resolve_to_their_settings():
    assert {"d2l", "d2l-mxnet", "d2l-jax"} <= set(CHOICES["recipe"])
    d2l = resolve_config({"root": "r"}, recipe="d2l")
    assert d2l.upsampler_bias and d2l.d2l_metrics and d2l.global_batch and d2l.batch_size == 32
    assert (d2l.lr, d2l.momentum, d2l.loss_reduction, d2l.score_init) == (1e-3, 0.0, "d2l", "default")
    mxnet = resolve_config({"root": "r"}, recipe="d2l-mxnet")
    assert (mxnet.lr, mxnet.momentum, mxnet.weight_decay, mxnet.loss_reduction) == (0.1, 0.0, 1e-3, "mean")
    assert mxnet.score_init == "xavier" and mxnet.upsampler_bias and mxnet.variant == "32s"
    jax = resolve_config({"root": "r"}, recipe="d2l-jax")
    assert jax.weights_backbone is None and jax.momentum == 0.9 and jax.loss_reduction == "mean"
    assert jax.upsampler_bias and jax.d2l_metrics and jax.border_as_background and jax.drop_small
    assert RECIPES["default"] == {}


def test_xavier_scores_are_mxnets_init():
    from fcnseg.models import build_model

    model = build_model("fcn_resnet18", num_classes=21, weights_backbone=None)
    init_scores(model, "xavier")
    bound = (6 / (512 + 21)) ** 0.5  # MXNet's Xavier(): uniform, magnitude 3 over the average fan
    weight = model.score32.weight.detach()
    assert float(weight.abs().max()) <= bound and float(weight.abs().max()) > 0.95 * bound
    assert float(weight.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    assert torch.count_nonzero(model.score32.bias) == 0


def test_the_recipes_batch_is_the_global_batch():
    config = resolve_config({"root": "r"}, recipe="d2l")
    assert [per_process_batch(config, w) for w in (1, 2, 4)] == [32, 16, 8]
    with pytest.raises(OptionError, match="global batch"):
        per_process_batch(config, 3)
    assert per_process_batch(resolve_config({"root": "r", "batch_size": 6}), 4) == 6  # default: per process


def test_cli_recipes_and_upsampler_bias_flag(capsys):
    assert main(["train", "--recipe", "d2l-mxnet", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "score_init: xavier" in printed and "upsampler_bias: true" in printed and "lr: 0.1" in printed
    assert main(["train", "--recipe", "d2l", "--no-upsampler-bias", "--print-config"]) == 0
    assert "upsampler_bias: false" in capsys.readouterr().out
    assert main(["train", "--upsampler-bias", "--print-config"]) == 0
    assert "upsampler_bias: true" in capsys.readouterr().out


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_under_torchrun_the_recipes_batch_is_shared_and_the_metrics_reduced(tmp_path):
    from fcnseg.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "data", num_classes=3, n=12, size=(64, 80), seed=0, progress=False)
    train_images = len((root / "train.txt").read_text().split())
    out = tmp_path / "ddp"
    args = ["train", "--recipe", "d2l", "--dataset", "folder", "--root", str(root), "--weights-backbone", "none",
            "--crop", "64x64", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--out", str(out), "--no-progress"]
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           "-m", "fcnseg", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["iteration"] == train_images // 4  # 2 images per process and step: the global batch is 4
    assert 0 <= record["train_acc"] <= 1 and 0 <= record["test_acc"] <= 1 and record["examples_per_sec"] > 0
    assert proc.stdout.count(f"read {train_images} examples") == 1  # printed once, by the first process
