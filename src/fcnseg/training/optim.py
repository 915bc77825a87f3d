"""The optimiser and the learning-rate schedule of a training run."""
from __future__ import annotations

import math
from typing import Callable

import torch

from fcnseg.training.config import TrainConfig


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters, as ``config.optimizer`` names."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    # foreach: one fused kernel per parameter group instead of one per tensor; torch enables it by
    # default only on CUDA, yet on CPU it also cuts the step time several-fold.
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           foreach=True)


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Args:
        schedule: "constant", "poly" (power 0.9) or "cosine", after a linear warm-up.
        total_steps: optimiser steps of the whole run.
        warmup_steps: steps of linear warm-up from ``1 / warmup_steps`` to 1; 0: none.
    """

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "poly":
            return (1 - progress) ** 0.9
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of ``config.schedule`` with ``config.warmup_iters`` of warm-up."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, total_steps, config.warmup_iters))
