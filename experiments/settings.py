"""What the experiment tables share: the bodies, the settings (full, quick), the recommended budgets.

FULL is the documented setting of Q1-Q6 (15 epochs of 256x352 crops); QUICK only checks the plumbing.
RECOMMENDED holds the recommended runs at the top of docs/RESULTS.md, per body: Q7 trains with them,
and Q6 with ``--budget recommended``.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class Body:
    key: str
    model: str
    name: str


BODIES = {
    "resnet18": Body("resnet18", "fcn_resnet18", "ResNet-18"),
    "mobilenet_v2": Body("mobilenet_v2", "fcn_mobilenet_v2", "MobileNetV2"),
}
UPSAMPLERS = {"bilinear": "bilinear init, learned", "xavier": "Xavier init, learned", "fixed": "bilinear, fixed"}


@dataclass(frozen=True)
class Settings:
    """Everything the tables share. FULL is the documented setting; QUICK only checks the plumbing."""

    name: str
    crop: str = "256x352"
    scale_range: tuple[str, str] = ("0.75", "1.25")
    batch_size: int = 8
    lr: str = "0.01"
    weight_decay: str = "0.0001"
    schedule: str = "poly"
    epochs: int | None = 15
    iterations: int | None = None
    warmup_iters: int = 0  # only the recommended budgets warm up (0: the option is left out of the command)
    eval_every: int = 5
    max_val_images: int | None = None
    # In-process loading: on a 2-core machine a loader worker takes its core from the training
    # threads (MobileNetV2 FCN-8s at 360x480: 24.5 s for 30 steps with 0 workers, 28.9 s with 1).
    workers: int = 0
    hardware_args: tuple[str, ...] = ()
    eval_amp: str = "auto"  # as the training runs validate, so Q5's plain whole-image row repeats it
    tune_trials: int = 12
    tune_budget: tuple[str, ...] = ("--epochs-per-trial", "3")
    tune_space: tuple[str, ...] = ("--lr-range", "0.001", "0.1", "--weight-decay-range", "0.00001", "0.001",
                                   "--batch-sizes", "4", "8", "16", "--crops", "192x256", "256x352", "320x448",
                                   "--schedules", "poly", "cosine", "--startup-trials", "5")
    # Selection without peeking (Q4's search, Q6's rows): the share of the training split held out
    # from training and scored instead of val (runs of consecutive frames, fcnseg.data.splits).
    holdout: str = "0.2"
    large_crop: str = "360x480"  # Q6's larger crops: CamVid's whole image
    wide_scale: tuple[str, str] = ("0.5", "2.0")  # Q6's multi-scale training
    tta: tuple[str, ...] = ("--scales", "0.75", "1", "1.25", "--flip")  # Q6/Q7's test-time augmentation
    seeds: tuple[int, ...] = (0, 1)  # Q7: a spread, not one draw
    bodies: tuple[str, ...] = ("resnet18", "mobilenet_v2")
    launcher: str = "subprocess"
    out: str = "runs/experiments"


FULL = Settings("full")
QUICK = Settings(
    "quick", crop="64x96", batch_size=2, epochs=None, iterations=2, eval_every=1, max_val_images=2, workers=0,
    hardware_args=("--amp", "none", "--channels-last", "false"), eval_amp="none", tune_trials=2,
    tune_budget=("--iterations-per-trial", "2"),
    tune_space=("--batch-sizes", "2", "4", "--crops", "64x96", "96x128", "--startup-trials", "2"),
    large_crop="96x128", bodies=("mobilenet_v2",), launcher="inprocess", out="runs/experiments-quick",
)

# The recommended runs of docs/RESULTS.md (MobileNetV2: 0.702 val mIoU in 52 min; ResNet-18 from random
# init: 0.619 in 76 min), as Settings fields. Q7 trains with them, changing crop and scale only when
# Q6 chose others at this budget (`--budget recommended`).
RECOMMENDED = {
    "mobilenet_v2": {"crop": "360x480", "scale_range": ("0.5", "2.0"), "batch_size": 8, "lr": "0.02",
                     "weight_decay": "0.0001", "schedule": "poly", "epochs": None, "iterations": 3600,
                     "warmup_iters": 100, "eval_every": 10},
    "resnet18": {"crop": "360x480", "scale_range": ("0.75", "1.75"), "batch_size": 8, "lr": "0.03",
                 "weight_decay": "0.0003", "schedule": "poly", "epochs": None, "iterations": 3800,
                 "warmup_iters": 200, "eval_every": 20},
}
# Issue 22's targets for the recommended (MobileNetV2) recipe: val mIoU, Pole IoU, training seconds.
TARGETS = {"miou": 0.72, "pole": 0.25, "seconds": 3600}
# Finished training runs without their checkpoints (runner.Runner's records), kept in the repository
# because runs/ is not: a new checkout finds them instead of training them again.
RECORDS = Path(__file__).resolve().parent / "records" / "runs"


def recommended_budget(settings: Settings, body: str) -> Settings:
    """``settings`` with the recommended run's budget of ``body``; the quick settings stay tiny (only a
    1-step warm-up is added, so that the option is exercised)."""
    if settings.name == "quick":
        return replace(settings, warmup_iters=1)
    return replace(settings, name="recommended", **RECOMMENDED[body])


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {metadata.version('torch')}"
