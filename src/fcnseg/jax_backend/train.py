"""``fcnseg train --backend jax``: fcnseg's training run with the optimiser steps in JAX.

`JaxTrainer` is fcnseg's `Trainer` with its model steps replaced: the run folder, data, seeded
augmentation, sampler and DataLoader, learning-rate schedule, metrics.jsonl, curves, callbacks and
`RunState` are the PyTorch run's own, so both backends read the same batches in the same order and
log the same records. The weights live in JAX (`fcnseg.jax_backend.step`): the PyTorch FCN is built
once (fcnseg's initialisation, ``--weights-backbone``, the recipe's score init) and converted; at the
end of each epoch, and before each checkpoint, the JAX weights and BatchNorm statistics are copied
back into it, so validation, the chapter's test accuracy and checkpoints (a standard fcnseg
checkpoint: ``fcnseg eval``, ``predict`` and ``export`` read it unchanged) use the same code as a
PyTorch run. A checkpoint also holds the JAX optimiser's state (``jax_optimizer``) for ``--resume``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from fcnseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from fcnseg.errors import CheckpointError, OptionError
from fcnseg.jax_backend.convert import flax_to_torch, from_torch_model
from fcnseg.jax_backend.models import VARIANTS as JAX_VARIANTS
from fcnseg.jax_backend.step import TrainStep
from fcnseg.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fcnseg.training.callbacks import Callback
from fcnseg.training.config import TrainConfig
from fcnseg.training.d2l_metrics import per_example_loss
from fcnseg.training.distributed import cleanup_distributed, setup_distributed
from fcnseg.training.rng import rng_state
from fcnseg.training.step import StepResult, ensure_finite_state, loss_diverged
from fcnseg.training.trainer import Trainer, TrainResult


def check_jax_config(config: TrainConfig) -> None:
    """Refuses the options the JAX backend does not carry out, naming each, before any work.

    Raises:
        OptionError: ``--amp bf16/fp16``, ``--variant 2s``, ``--cache-features``, a loss other than ``ce``, a
            ``--device`` other than cpu/auto, or a torchrun launch.
    """
    if config.amp in ("bf16", "fp16"):
        raise OptionError(f"--amp {config.amp}: the JAX backend trains in float32; use --amp none (or auto)")
    if config.variant not in JAX_VARIANTS:
        raise OptionError(f"--variant {config.variant}: the JAX backend builds FCN-{', '.join(JAX_VARIANTS)}; "
                          "use one of them, or --backend torch")
    if config.cache_features:
        raise OptionError("--cache-features: not supported with --backend jax (its head training is PyTorch's); "
                          "use --backend torch, or drop --cache-features")
    if getattr(config, "loss", "ce") != "ce":
        raise OptionError(f"--loss {config.loss}: the JAX backend trains the cross-entropy only; use --loss ce "
                          "or --backend torch")
    if config.device not in ("auto", "cpu"):
        raise OptionError(f"--device {config.device}: the JAX backend runs on the CPU here; use --device cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OptionError("--backend jax trains in one process; launch it without torchrun")


def _optimizer_leaves(opt_state: Any) -> list[torch.Tensor]:
    """The optimiser state as a list of tensors, what a ``weights_only`` checkpoint can hold."""
    return [torch.from_numpy(np.array(leaf)) for leaf in jax.tree_util.tree_leaves(opt_state)]


class JaxTrainer(Trainer):
    """fcnseg's `Trainer` whose steps run in JAX; see the module's docstring."""

    def set_up_model(self) -> None:
        """The PyTorch FCN as fcnseg builds it, then its Flax twin and variables."""
        super().set_up_model()
        self.module, variables = from_torch_model(self.model)
        self.params, self.batch_stats = variables["params"], variables["batch_stats"]

    def set_up_optimisation(self) -> None:
        """fcnseg's sampler, run length and schedule (the torch optimiser only carries the learning
        rate the schedule sets), then the JAX optimiser and its compiled step."""
        super().set_up_optimisation()
        self.amp_dtype = None  # validation too runs in float32, as the JAX steps do
        config = self.config
        weights = None if self.class_weights is None else self.class_weights.cpu().numpy()
        self.step = TrainStep(self.module, config.optimizer, momentum=config.momentum,
                              weight_decay=config.weight_decay, reduction=config.loss_reduction, class_weights=weights)
        self.opt_state = self.step.init(self.params)

    def resume(self) -> None:
        """fcnseg's resume (weights, schedule, RNGs, run state), then the JAX weights and optimiser."""
        if not (self.config.resume and self.last_path.exists()):
            return super().resume()
        leaves = load_checkpoint(self.last_path).get("jax_optimizer")
        treedef = jax.tree_util.tree_structure(self.opt_state)
        if leaves is None or len(leaves) != treedef.num_leaves:
            raise CheckpointError(f"{self.last_path} was not written by --backend jax (no JAX optimiser state); "
                                  "resume it with --backend torch, or start a new run in another --out")
        super().resume()
        self.module, variables = from_torch_model(self.model)
        self.params, self.batch_stats = variables["params"], variables["batch_stats"]
        self.opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(t.numpy()) for t in leaves])

    def set_up_loss(self) -> None:
        """The training pairs as loaded; the loss itself is part of the compiled JAX step."""
        self.train_net, self.train_set = self.net, self.data.train

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimiser step over ``config.accumulate`` micro-batches (gradients averaged), at the
        learning rate fcnseg's schedule gives, then the schedule's step."""
        lr = self.optimizer.param_groups[0]["lr"]
        total, grads, images = 0.0, None, 0
        for image, target in micro_batches:
            out = self.step.gradients(self.params, self.batch_stats, image.numpy(),
                                      target.numpy().astype(np.int32))
            loss = float(out.loss)
            if not math.isfinite(loss):
                raise loss_diverged(loss)
            self.batch_stats = out.batch_stats
            grads = out.grads if grads is None else jax.tree_util.tree_map(jnp.add, grads, out.grads)
            self.chapter.train_tally.correct += float(out.correct)
            self.chapter.train_tally.pixels += float(out.labelled)
            total, images = total + loss, images + image.shape[0]
        count = len(micro_batches)
        if count > 1:
            grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        self.params, self.opt_state = self.step.apply(self.params, self.opt_state, grads, lr)
        self.optimizer.step()  # no gradients there, so nothing changes: it tells the schedule a step was taken
        result = per_example_loss(StepResult(loss=total / count, images=images), self.config.loss_reduction,
                                  self.config.accumulate)
        self.scheduler.step()
        self.state.count_step(result.loss, result.images)
        return result

    def sync_torch_model(self) -> None:
        """Copies the JAX weights and BatchNorm statistics into the PyTorch FCN."""
        state = flax_to_torch({"params": self.params, "batch_stats": self.batch_stats})
        self.model.load_state_dict(state, strict=True)

    def end_epoch(self) -> None:
        self.sync_torch_model()
        super().end_epoch()

    def save(self, path: Path, metrics: dict[str, Any] | None = None) -> None:
        """A standard fcnseg checkpoint of the synchronised PyTorch FCN, plus the JAX optimiser's state."""
        self.sync_torch_model()
        ensure_finite_state(self.model)
        checkpoint = make_checkpoint(
            self.model, classes=self.data.classes, colors=self.data.colors, ignore_index=IGNORE_INDEX,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, config=self.config.to_plain_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), scaler=None,
            rng=rng_state(), metrics=metrics, backend="jax", jax_optimizer=_optimizer_leaves(self.opt_state),
            **self.state.to_checkpoint(),
        )
        save_checkpoint(checkpoint, path)


def train_jax(config: TrainConfig, *, callbacks: Iterable[Callback] | None = None, progress: bool = True,
              **data_sources: Any) -> TrainResult:
    """`fcnseg.training.train` with the optimiser steps in JAX (same arguments, same outputs).

    Raises:
        OptionError: an option the JAX backend does not carry out (`check_jax_config`).
        FcnsegError: as `fcnseg.training.train`.
    """
    config = dataclasses.replace(config).validate()
    check_jax_config(config)
    device = torch.device("cpu")
    ctx = setup_distributed(device.type)
    try:
        with contextlib.ExitStack() as cleanup:
            trainer = JaxTrainer(config, device, ctx, callbacks=list(callbacks or []), progress=progress,
                                 cleanup=cleanup)
            return trainer.run(**data_sources)
    finally:
        cleanup_distributed()
