"""The training loop, top to bottom: set-up, resume, epochs of steps, end of epoch, finish.

`train` reads a resolved `TrainConfig` (the CLI builds it) and, optionally, the user's own datasets
and transforms. It works in one process or under ``torchrun`` (DDP: rank 0 logs and writes
checkpoints; metrics are reduced across ranks). Everything the loop counts lives in one `RunState`,
which every checkpoint saves and a resumed run restores, so a run killed at any step and resumed
ends with the weights an unbroken run would have.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from fcnseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from fcnseg.data.samplers import ResumableSampler, size_grouped_batches
from fcnseg.errors import FcnsegError
from fcnseg.evaluation import evaluate
from fcnseg.models import build_model
from fcnseg.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fcnseg.models.layout import to_channels_last
from fcnseg.progress import format_duration, progress_bar
from fcnseg.runtime import resolve_amp_dtype, select_device
from fcnseg.training.callbacks import Callback, CallbackList, EpochEndFunction
from fcnseg.training.config import TrainConfig
from fcnseg.training.d2l_metrics import ChapterMetrics, init_scores, per_example_loss, per_process_batch
from fcnseg.training.datasets import PairTransform, TrainingData, build_training_data, holdout_message
from fcnseg.training.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from fcnseg.training.loss import logits_loss, median_frequency_weights
from fcnseg.training.optim import build_optimizer, build_scheduler
from fcnseg.training.resume import check_resumable
from fcnseg.training.rng import rng_state, seed_everything, set_rng_state
from fcnseg.training.run_dir import claim_run_folder
from fcnseg.training.run_log import RunLog
from fcnseg.training.state import RunState
from fcnseg.training.step import StepResult, ensure_finite_state, train_step


@dataclass
class TrainResult:
    """Where a run wrote its outputs and how it ended."""

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_miou: float
    final_metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    train_seconds: float


def train(
    config: TrainConfig,
    *,
    train_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    train_transforms: PairTransform | None = None,
    val_transforms: PairTransform | None = None,
    callbacks: Iterable[Callback] | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Runs (or, with ``config.resume``, resumes) a training run and returns where its outputs are.

    Example, with your own data::

        config = TrainConfig(model="fcn_resnet18", crop=(256, 256), epochs=10, out="runs/mine")
        result = train(config, train_dataset=MyPairs("train"), val_dataset=MyPairs("val"))

    Args:
        config: the resolved settings.
        train_dataset: your training pairs, ``(image uint8 (3, H, W), target int64 (H, W))`` with
            void pixels `fcnseg.constants.IGNORE_INDEX`, untransformed; it must have ``classes`` (a
            list of names, label i named ``classes[i]``) and may have ``colors`` (one RGB per class;
            default: `fcnseg.data.default_palette`). None: ``config.dataset`` at ``config.root``.
        val_dataset: your validation pairs, raw like ``train_dataset``; None: the named dataset's
            ``config.val_split``.
        train_transforms: paired ``transforms(image, target) -> (image, target)`` applied to every
            training pair under an RNG seeded by (seed, epoch, index); must return a normalised
            float image and equal-sized crops. None: the config's augmentation.
        val_transforms: paired transforms for validation pairs; None: `fcnseg.data.eval_transforms`
            (normalisation only). Pass ``lambda image, target: (image, target)`` for a dataset
            that already returns transformed pairs.
        callbacks: `Callback` objects whose ``on_step_end`` and ``on_epoch_end`` run on every rank,
            in order. An exception one raises stops the run there, with last.pt resumable.
        progress: show progress: tqdm's bar on a terminal, else a plain line every 10 s and per epoch.
        on_epoch_end: a plain ``function(record)`` called after the callbacks' ``on_epoch_end``,
            with the epoch's metrics.jsonl record; `fcnseg tune` prunes trials this way.

    Raises:
        FcnsegError: bad data or options, a foreign or truncated checkpoint on resume, or a loss
            that diverged (the last good checkpoint is kept); a `RunFolderError` (a usage error) when
            ``config.out`` holds a run and neither ``config.resume`` nor ``config.overwrite`` is set,
            or another run holds its lock.
    """
    callbacks = list(callbacks or [])
    if on_epoch_end is not None:
        callbacks.append(EpochEndFunction(on_epoch_end))
    config = dataclasses.replace(config).validate()  # a checked copy: the CLI's checks for Python callers too
    device = select_device(config.device)
    ctx = setup_distributed(device.type)
    try:
        if device.type == "cuda" and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
        with contextlib.ExitStack() as cleanup:
            trainer = Trainer(config, device, ctx, callbacks=callbacks, progress=progress, cleanup=cleanup)
            return trainer.run(train_dataset=train_dataset, val_dataset=val_dataset,
                               train_transforms=train_transforms, val_transforms=val_transforms)
    finally:
        cleanup_distributed()


class Trainer:
    """One training run: `run` calls the named steps below in the order they are defined."""

    def __init__(self, config: TrainConfig, device: torch.device, ctx: DistributedContext, *,
                 callbacks: Iterable[Callback], progress: bool, cleanup: contextlib.ExitStack) -> None:
        self.config, self.device, self.ctx = config, device, ctx
        self.callbacks = CallbackList(callbacks)
        self.progress, self.cleanup = progress, cleanup
        self.out = Path(config.out)
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"
        self.state = RunState()
        self.log: RunLog | None = None  # rank 0 only
        # A run killed after its last checkpoint but before metrics.json has nothing left to train: its
        # checkpoint's metrics are the final ones. Otherwise the last epoch's validation replaces them.
        self.final_metrics: dict[str, Any] | None = None

    def run(self, **data_sources: Any) -> TrainResult:
        """Set-up, resume, then epochs until the last step; ``data_sources`` go to `build_training_data`."""
        # First the folder: a run into another run's folder is refused before any work (run_dir.py).
        claim_run_folder(self.out, resume=self.config.resume, overwrite=self.config.overwrite, ctx=self.ctx,
                         device=self.device, cleanup=self.cleanup)
        # The order matters for exact resume: seeding, then data, then the model's random init.
        seed_everything(self.config.seed)
        self.data: TrainingData = build_training_data(self.config, **data_sources, progress=self.progress and self.ctx.is_main)
        self.set_up_model()
        self.set_up_optimisation()
        self.resume()
        if self.ctx.is_main:
            self.log = RunLog(self.out, self.config, self.state.global_step, self.cleanup)
        self.set_up_validation(self.data.raw_val)
        self.started = time.perf_counter() - self.state.train_seconds  # feature caching counts as training
        self.set_up_loss()
        while self.state.global_step < self.total_steps:
            self.train_epoch()
            self.end_epoch()
        return self.finish()

    # -- set-up ------------------------------------------------------------------------------------

    def set_up_model(self) -> None:
        """The model on its device (``net``: wrapped in DistributedDataParallel under torchrun)."""
        config = self.config
        self.model = build_model(
            config.model,
            variant=config.variant,
            num_classes=len(self.data.classes),
            weights_backbone=config.weights_backbone,
            upsampler=config.upsampler,
            upsampler_bias=config.upsampler_bias,
            freeze_backbone=config.freeze_backbone,
        )
        init_scores(self.model, config.score_init)
        self.model.to(self.device)
        if config.channels_last:
            to_channels_last(self.model)
        self.net: torch.nn.Module = self.model
        if self.ctx.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def set_up_optimisation(self) -> None:
        """Sampler and run length, optimiser, schedule, fp16 gradient scaler, class weights."""
        config, ctx = self.config, self.ctx
        self.batch_size = per_process_batch(config, ctx.world_size)  # a recipe's global batch, shared out
        self.sampler = ResumableSampler(len(self.data.train), seed=config.seed, shuffle=True, rank=ctx.rank,
                                        world_size=ctx.world_size)
        self.steps_per_epoch = len(self.sampler) // (self.batch_size * config.accumulate)
        if self.steps_per_epoch == 0:
            raise FcnsegError(
                f"the training split has {len(self.data.train)} images, fewer than one step of "
                f"{self.batch_size * config.accumulate * ctx.world_size}; lower --batch-size"
            )
        self.total_steps = config.iterations or config.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)
        self.amp_dtype = resolve_amp_dtype(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.class_weights = None
        if config.class_weights == "median-frequency":
            self.class_weights = median_frequency_weights(self.data.raw_train, len(self.data.classes)).to(self.device)

    def resume(self) -> None:
        """With ``config.resume``, restores weights, optimiser, schedule, RNGs and run state from last.pt."""
        if not self.config.resume:
            return
        if not self.last_path.exists():
            if self.ctx.is_main:
                print(f"--resume: no checkpoint at {self.last_path} yet, starting from scratch")
            return
        checkpoint = load_checkpoint(self.last_path)
        check_resumable(checkpoint, self.config, self.data.classes)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        self.state = RunState.from_checkpoint(checkpoint)
        self.final_metrics = checkpoint.get("metrics")
        if self.ctx.is_main:
            print(f"resuming {self.last_path}: epoch {self.state.epoch + 1}, "
                  f"step {self.state.global_step}/{self.total_steps}")

    def set_up_validation(self, val_dataset: Dataset | None) -> None:
        """Batches of equal-sized whole images (this rank's share), whole or sliding prediction, and the
        chapter's metrics (with ``d2l_metrics``; they print its "read N examples" counts)."""
        if self.config.holdout and self.ctx.is_main:
            print(holdout_message(self.config, self.data))
        self.val_batches = size_grouped_batches(self.data.val_image_sizes(), self.batch_size, self.ctx.rank,
                                                self.ctx.world_size)
        self.chapter = ChapterMetrics.for_run(self.config, self.data.raw_train, val_dataset, device=self.device,
                                              ctx=self.ctx, amp_dtype=self.amp_dtype, batch_size=self.batch_size)
        self.predict_fn = None
        if self.config.eval_mode == "sliding":
            from fcnseg.inference.windows import predict_sliding

            self.predict_fn = functools.partial(predict_sliding, window=tuple(self.config.crop))

    def set_up_loss(self) -> None:
        """What a step trains (``train_net`` on ``train_set``) and its loss function."""
        config, ctx = self.config, self.ctx
        self.train_net, self.train_set = self.net, self.data.train
        self.compute_loss = None
        # read from its module when the run starts, so that tests can replace it
        from fcnseg.training.loss import fcn_cross_entropy

        if config.loss == "ce+dice" and not ctx.enabled:  # fused with a first pass for Dice's sums
            self.compute_loss = functools.partial(fcn_cross_entropy, self.model, class_weights=self.class_weights,
                                                  dice=True)
            return
        if config.loss != "ce":  # the other losses for thin classes need the logits: unfused
            self.compute_loss = functools.partial(logits_loss, self.net, config.loss, class_weights=self.class_weights)
            return
        if not ctx.enabled:  # DDP synchronises gradients through the wrapper's forward: unfused there
            self.compute_loss = functools.partial(fcn_cross_entropy, self.model, class_weights=self.class_weights,
                                                  reduction=config.loss_reduction)
        if config.freeze_backbone and config.cache_features > 0:
            # The frozen body runs once per cached view instead of every step: the loop trains the head
            # on stored features. Checkpoints and validation (whole images) still use the full model.
            from fcnseg.training.feature_cache import cached_head_training

            self.train_net, self.train_set = cached_head_training(self.model, self.data.train, config, self.device,
                                                                  ctx, progress=self.progress)
            if not ctx.enabled:  # DDP must see the forward call to synchronise gradients: unfused there
                self.compute_loss = functools.partial(self.train_net.loss, class_weights=self.class_weights,
                                                      reduction=config.loss_reduction)
        elif config.d2l_metrics:  # the same loss, counting train accuracy on the step's logits
            self.compute_loss = self.chapter.loss_function(self.model, self.net, fused=not ctx.enabled,
                                                           class_weights=self.class_weights)

    # -- one epoch ---------------------------------------------------------------------------------

    def train_epoch(self) -> None:
        """The optimiser steps of one epoch, from ``state.step_in_epoch`` when resuming mid-epoch."""
        config, state = self.config, self.state
        micro_per_step = config.accumulate
        self.sampler.set_epoch(state.epoch, start=state.step_in_epoch * self.batch_size * micro_per_step)
        self.train_set.set_epoch(state.epoch)
        # A fresh loader each epoch: its workers copy the dataset's new epoch (and end with the epoch,
        # freeing their memory before validation).
        loader = DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                            num_workers=config.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        steps_this_epoch = min(self.steps_per_epoch, self.total_steps - (state.global_step - state.step_in_epoch))
        # A bar on a terminal, plain lines (every 10 s and at the epoch's end) in a log file: fcnseg/progress.py.
        bar = progress_bar(total=steps_this_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{self.epochs}",
                           unit="step", disable=not (self.progress and self.ctx.is_main))
        self.model.train()
        self.chapter.start_epoch()
        batches = iter(loader)
        while state.step_in_epoch < steps_this_epoch:
            tic = time.perf_counter()
            result = self.train_step([next(batches) for _ in range(micro_per_step)])
            self.end_step(result, tic, bar, last_in_epoch=state.step_in_epoch == steps_this_epoch)
        bar.close()

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimiser step over ``config.accumulate`` micro-batches, then the schedule's step."""
        config = self.config
        result = train_step(self.train_net, micro_batches, self.optimizer, device=self.device,
                            amp_dtype=self.amp_dtype, scaler=self.scaler, channels_last=config.channels_last,
                            class_weights=self.class_weights, loss_reduction=config.loss_reduction,
                            no_sync=self.train_net.no_sync if self.ctx.enabled else None,
                            compute_loss=self.compute_loss)
        result = per_example_loss(result, config.loss_reduction, config.accumulate)  # logged as the chapter does
        self.scheduler.step()
        self.state.count_step(result.loss, result.images)
        return result

    def end_step(self, result: StepResult, tic: float, bar: Any, *, last_in_epoch: bool) -> None:
        """Progress bar and TensorBoard, the periodic mid-epoch checkpoint, then ``on_step_end``."""
        config, state = self.config, self.state
        rate = result.images * self.ctx.world_size / max(time.perf_counter() - tic, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        state.train_seconds = time.perf_counter() - self.started
        run_eta = (self.total_steps - state.global_step) * state.train_seconds / max(state.global_step, 1)
        bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", run_eta=format_duration(run_eta))
        bar.update(1)  # after the postfix: a plain line written by this update shows this step's numbers
        if self.log is not None:
            self.log.step(state.global_step, result.loss, lr)
        # The end of the epoch writes its own checkpoint (with the epoch's metrics): none here then.
        if config.checkpoint_every and state.global_step % config.checkpoint_every == 0 and not last_in_epoch:
            if self.ctx.is_main:
                self.save(self.last_path)
            barrier(self.ctx)
        self.callbacks.on_step_end(state, result)

    # -- end of epoch ------------------------------------------------------------------------------

    def end_epoch(self) -> None:
        """Validates when due, logs the epoch's record, writes checkpoints and curves, calls ``on_epoch_end``."""
        config, state = self.config, self.state
        epoch = state.epoch + 1  # 1-based, as printed and logged
        epoch_loss = all_reduce_mean(state.epoch_loss_sum / max(state.epoch_images, 1), self.ctx, self.device)
        record: dict[str, Any] = {"epoch": epoch, "iteration": state.global_step, "train_loss": epoch_loss,
                                  "lr": self.optimizer.param_groups[0]["lr"], "time_s": round(state.train_seconds, 1)}
        last_epoch = state.global_step >= self.total_steps
        if epoch % config.eval_every == 0 or last_epoch:
            record.update(self.chapter.epoch_record(self.model, state.epoch_images, state.epoch))  # {} without d2l_metrics
            record.update(self.validate(epoch, epoch_loss, last_epoch=last_epoch))
        state.end_epoch(record)
        if self.log is not None:
            self.log.epoch(record, state.global_step)
            if "miou" in record and record["miou"] > state.best_miou:
                state.best_miou = record["miou"]
                self.save(self.best_path, self.final_metrics)
            if epoch % config.save_every == 0 or last_epoch:
                self.save(self.last_path, self.final_metrics)
            if "miou" in record:
                self.log.curves(state.history)
        barrier(self.ctx)
        self.callbacks.on_epoch_end(state, record)

    def validate(self, epoch: int, epoch_loss: float, *, last_epoch: bool) -> dict[str, float]:
        """Whole-image metrics on the validation set (reduced over ranks); the record's metric fields."""
        loader = DataLoader(self.data.val, batch_sampler=self.val_batches, num_workers=self.config.workers)
        metrics, matrix, val_loss = evaluate(self.model, loader, len(self.data.classes), device=self.device,
                                             predict=self.predict_fn, amp_dtype=self.amp_dtype,
                                             channels_last=self.config.channels_last,
                                             reduce_across_ranks=self.ctx.enabled)
        self.final_metrics = metrics.as_dict(self.data.classes)
        if self.log is not None:
            self.log.validation(epoch, epoch_loss, val_loss, metrics)
            if last_epoch:
                self.log.final_validation(metrics, matrix, self.data.classes)
        return {"val_loss": val_loss, "pixel_acc": metrics.pixel_acc, "mean_acc": metrics.mean_acc,
                "miou": metrics.miou, "fwiou": metrics.fwiou}

    def save(self, path: Path, metrics: dict[str, Any] | None = None) -> None:
        """Writes a resumable checkpoint (atomically), unless the weights or BatchNorm statistics are not finite."""
        ensure_finite_state(self.model)
        checkpoint = make_checkpoint(
            self.model, classes=self.data.classes, colors=self.data.colors, ignore_index=IGNORE_INDEX,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, config=self.config.to_plain_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None, rng=rng_state(), metrics=metrics,
            **self.state.to_checkpoint(),
        )
        save_checkpoint(checkpoint, path)

    # -- finish ------------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """Closes the logs, writes metrics.json, and says where everything is."""
        if self.log is not None:
            self.log.finish(self.final_metrics)
        return TrainResult(out_dir=self.out, last_checkpoint=self.last_path,
                           best_checkpoint=self.best_path if self.best_path.exists() else None,
                           best_miou=self.state.best_miou, final_metrics=self.final_metrics,
                           history=self.state.history, train_seconds=self.state.train_seconds)
