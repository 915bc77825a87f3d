"""Two test-time levers for CamVid's Pole class, scored on the holdout of train (val never read).

Outside Q6's rule: a probe of whether Pole's low IoU is a matter of the decision threshold or of
resolution. For one checkpoint trained with ``fcnseg train --holdout F``, it predicts the held-out
training images at each input scale and prints mIoU and the thin classes' IoU for each strength tau of
post-hoc logit adjustment (logits - tau * log prior, the prior being each class's pixel frequency in
the images the run trained on; Menon et al. 2021), which favours rare classes without retraining.

    python experiments/pole_probes.py runs/experiments/runs/<run>/last.pt --scales 1 1.5 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from repo_paths import shared_data_dir

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data import build_dataset
from fcnseg.data.splits import holdout_split
from fcnseg.data.transforms import eval_transforms
from fcnseg.inference.windows import predict_scales, predict_whole
from fcnseg.metrics import ConfusionMatrix
from fcnseg.models.checkpoint import load_checkpoint, model_from_checkpoint
from fcnseg.models.inference_form import inference_form
from fcnseg.runtime import autocast_context, resolve_amp_dtype

SHOWN = ("Pole", "SignSymbol", "Fence", "Pedestrian", "Bicyclist")  # the thin and rare classes


def class_prior(dataset: torch.utils.data.Dataset, indices: list[int], num_classes: int) -> torch.Tensor:
    """Each class's share of the labelled pixels in ``dataset``'s masks at ``indices``."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for index in indices:
        mask = dataset[index][1]
        counts += torch.bincount(mask[mask != IGNORE_INDEX].flatten(), minlength=num_classes)[:num_classes].double()
    return counts / counts.sum()


@torch.inference_mode()
def probe(checkpoint: dict, root: Path, holdout: float, scales: list[float], taus: list[float], *,
          dataset_name: str = "camvid", amp: str = "auto") -> dict[tuple[float, float], ConfusionMatrix]:
    """Confusion matrices of the images ``fcnseg train --holdout`` held out of the train split, per
    (input scale, tau), for a checkpoint as `load_checkpoint` returns it; ``amp`` as ``fcnseg eval --amp``."""
    classes = list(checkpoint["classes"])
    model = inference_form(model_from_checkpoint(checkpoint), copy_model=False).eval()
    normalised = eval_transforms(mean=tuple(checkpoint["mean"]), std=tuple(checkpoint["std"]))
    dataset = build_dataset(dataset_name, root, "train", transforms=normalised)
    trained, held = holdout_split(len(dataset), holdout)
    log_prior = class_prior(dataset, trained, len(classes)).log().float()[:, None, None]
    matrices = {(s, t): ConfusionMatrix(len(classes), IGNORE_INDEX) for s in scales for t in taus}
    amp_dtype = resolve_amp_dtype(amp, torch.device("cpu"))
    for index in held:
        image, target = dataset[index]
        for scale in scales:
            with autocast_context(torch.device("cpu"), amp_dtype):
                logits = predict_scales(lambda x: predict_whole(model, x), image[None], (scale,)).float()
            for tau in taus:
                matrices[scale, tau].update((logits - tau * log_prior).argmax(1), target[None])
    return matrices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="last.pt of a run trained with --holdout")
    parser.add_argument("--holdout", type=float, default=0.2, help="the run's --holdout (default 0.2)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="input scales, one pass each")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                        help="logit adjustment strengths (0: plain argmax)")
    parser.add_argument("--root", type=Path, default=None, help="CamVid folder (default: the shared data's)")
    args = parser.parse_args(argv)
    root = args.root or shared_data_dir() / "camvid"
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint not found: {args.checkpoint}")
    checkpoint = load_checkpoint(args.checkpoint)
    classes = list(checkpoint["classes"])
    for (scale, tau), matrix in probe(checkpoint, root, args.holdout, args.scales, args.taus).items():
        metrics = matrix.compute()
        iou = dict(zip(classes, metrics.per_class_iou))
        thin = " ".join(f"{name} {100 * iou[name]:.1f}" for name in SHOWN if iou.get(name) is not None)
        print(f"scale {scale:g} tau {tau:g}: mIoU {100 * metrics.miou:.1f} pixel acc {100 * metrics.pixel_acc:.1f} {thin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
