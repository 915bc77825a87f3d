"""The training pipeline, top to bottom: data, model, optimiser, resume, loop, checkpoints, logs.

Reads a resolved `TrainConfig`; the CLI builds that config. Works in one process or under
``torchrun`` (DDP: rank 0 logs and writes checkpoints; metrics are reduced across ranks).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from fcnseg.constants import IMAGENET_MEAN, IMAGENET_STD
from fcnseg.data.samplers import ResumableSampler, SeededTransformDataset, image_sizes, size_grouped_batches
from fcnseg.errors import CheckpointError, FcnsegError
from fcnseg.evaluation import evaluate
from fcnseg.metrics import format_metrics_table
from fcnseg.models import build_model
from fcnseg.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fcnseg.models.layout import to_channels_last
from fcnseg.runtime import resolve_amp_dtype, select_device
from fcnseg.training.config import TrainConfig
from fcnseg.training.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from fcnseg.training.loss import median_frequency_weights
from fcnseg.training.step import TrainingDiverged, train_step

# Test hook: SIGKILL this process right after the given optimiser step, to prove exact resume.
KILL_AFTER_STEP_ENV = "FCNSEG_TEST_KILL_AFTER_STEP"


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


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch; called once per run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    # Plain types only, so the checkpoint loads with weights_only=True.
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def build_datasets(config: TrainConfig):
    """(train dataset with seeded random transforms, val dataset with eval transforms)."""
    from fcnseg.data import build_dataset
    from fcnseg.data.transforms import d2l_transforms, eval_transforms, train_transforms

    options: dict[str, Any] = {}
    if config.border_as_background and config.dataset == "voc2012":
        options["border_as_background"] = True  # only VOC has a border class to re-read
    train_options = dict(options)
    if config.drop_small:
        train_options["drop_smaller_than"] = tuple(config.crop)
    train_base = build_dataset(config.dataset, config.root, config.train_split, transforms=None, **train_options)
    if config.recipe == "d2l":
        transforms = d2l_transforms(crop_size=tuple(config.crop))
    else:
        transforms = train_transforms(
            crop_size=tuple(config.crop),
            scale_range=tuple(config.scale_range) if config.scale_range else None,
            hflip=config.hflip,
            color_jitter=config.color_jitter,
        )
    train = SeededTransformDataset(train_base, transforms, config.seed)
    val = build_dataset(config.dataset, config.root, config.val_split, transforms=eval_transforms(), **options)
    if config.max_val_images:
        val = torch.utils.data.Subset(val, range(min(len(val), config.max_val_images)))
    return train_base, train, val


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int):
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""

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


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    # foreach: one fused kernel per parameter group instead of one per tensor; torch enables it by
    # default only on CUDA, yet on CPU it also cuts the step time several-fold.
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, foreach=True)


def _log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Runs (or resumes) a training run and returns where its outputs are.

    Args:
        config: the resolved settings.
        progress: show a progress bar.
        on_epoch_end: called on every rank after each epoch with that epoch's record (the line
            appended to metrics.jsonl: epoch, iteration, train_loss, lr, time_s and, on evaluation
            epochs, miou and the other metrics), once its checkpoint is written. An exception it
            raises stops the run there, with last.pt resumable; `fcnseg tune` prunes trials this way.

    Raises:
        FcnsegError: bad data or options, a foreign or truncated checkpoint on resume, or a loss
            that diverged (the last good checkpoint is kept).
    """
    device = select_device(config.device)
    ctx = setup_distributed(device.type)
    try:
        if device.type == "cuda" and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
        # The stack closes the TensorBoard writer even when the run stops early (divergence, a
        # pruned tuning trial): a tuning process runs many trials and must not leak writer threads.
        with contextlib.ExitStack() as cleanup:
            return _train(config, device, ctx, progress, on_epoch_end, cleanup)
    finally:
        cleanup_distributed()


def _train(config: TrainConfig, device: torch.device, ctx: DistributedContext, progress: bool,
           on_epoch_end: Callable[[dict[str, Any]], None] | None, cleanup: contextlib.ExitStack) -> TrainResult:
    from tqdm.auto import tqdm

    out = Path(config.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    seed_everything(config.seed)
    train_base, train_set, val_set = build_datasets(config)
    classes = list(train_base.classes)
    colors = [list(c) for c in train_base.colors]
    num_classes = len(classes)

    model = build_model(
        config.model,
        variant=config.variant,
        num_classes=num_classes,
        weights_backbone=config.weights_backbone,
        upsampler=config.upsampler,
        freeze_backbone=config.freeze_backbone,
    )
    model.to(device)
    if config.channels_last:
        to_channels_last(model)
    net = model
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ResumableSampler(len(train_set), seed=config.seed, shuffle=True, rank=ctx.rank, world_size=ctx.world_size)
    micro_per_step = config.accumulate
    steps_per_epoch = len(sampler) // (config.batch_size * micro_per_step)
    if steps_per_epoch == 0:
        raise FcnsegError(
            f"the training split has {len(train_set)} images, fewer than one step of "
            f"{config.batch_size * micro_per_step * ctx.world_size}; lower --batch-size"
        )
    total_steps = config.iterations or config.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    optimizer = build_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, total_steps, config.warmup_iters))
    amp_dtype = resolve_amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    class_weights = None
    if config.class_weights == "median-frequency":
        class_weights = median_frequency_weights(train_base, num_classes).to(device)

    resumed_metrics = None
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_miou": -1.0, "history": [],
             "epoch_loss_sum": 0.0, "epoch_images": 0, "train_seconds": 0.0}
    if config.resume and last_path.exists():
        checkpoint = load_checkpoint(last_path)
        _check_resumable(checkpoint, config, classes)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        state.update({k: checkpoint[k] for k in state if k in checkpoint})
        resumed_metrics = checkpoint.get("metrics")
        if ctx.is_main:
            print(f"resuming {last_path}: epoch {state['epoch'] + 1}, step {state['global_step']}/{total_steps}")
    elif config.resume and ctx.is_main:
        print(f"--resume: no checkpoint at {last_path} yet, starting from scratch")

    writer = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))
        from torch.utils.tensorboard import SummaryWriter

        writer = cleanup.enter_context(SummaryWriter(str(out / "tensorboard"), purge_step=state["global_step"] or None))

    def save(path: Path, metrics: dict[str, Any] | None = None) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDiverged("weights became NaN or infinite; stopping without overwriting the last good checkpoint")
        checkpoint = make_checkpoint(
            model, classes=classes, colors=colors, ignore_index=255, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            config=_plain(config.to_dict()), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None, rng=rng_state(), metrics=metrics,
            **{k: state[k] for k in state},
        )
        save_checkpoint(checkpoint, path)

    val_sizes = image_sizes(val_set)
    val_batches = size_grouped_batches(val_sizes, config.batch_size, ctx.rank, ctx.world_size)
    predict_fn = None
    if config.eval_mode == "sliding":
        from fcnseg.inference.windows import predict_sliding

        predict_fn = lambda m, x: predict_sliding(m, x, window=tuple(config.crop))  # noqa: E731
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0") or 0)
    # A run killed after its last checkpoint but before metrics.json has nothing left to train: its
    # checkpoint's metrics are the final ones. Otherwise the last epoch's validation replaces them.
    final_metrics = resumed_metrics
    started = time.perf_counter() - state["train_seconds"]
    train_net, compute_loss = net, None
    if not ctx.enabled:  # DDP synchronises gradients through the wrapper's forward: unfused there
        from fcnseg.training.loss import fcn_cross_entropy

        compute_loss = functools.partial(fcn_cross_entropy, model, class_weights=class_weights,
                                         reduction=config.loss_reduction)
    if config.freeze_backbone and config.cache_features > 0:
        # The frozen body runs once per cached view instead of every step: the loop trains the head
        # on stored features. Checkpoints and validation (whole images) still use the full model.
        from fcnseg.training.feature_cache import cached_head_training

        train_net, train_set = cached_head_training(model, train_set, config, device, ctx, progress=progress)
        if not ctx.enabled:  # DDP must see the forward call to synchronise gradients: unfused there
            compute_loss = functools.partial(train_net.loss, class_weights=class_weights,
                                             reduction=config.loss_reduction)

    while state["global_step"] < total_steps:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, start=state["step_in_epoch"] * config.batch_size * micro_per_step)
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                            num_workers=config.workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        steps_this_epoch = min(steps_per_epoch, total_steps - (state["global_step"] - state["step_in_epoch"]))
        bar = tqdm(total=steps_this_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{epochs}",
                   unit="step", disable=not (progress and ctx.is_main), dynamic_ncols=True)
        model.train()
        batches = iter(loader)
        while state["step_in_epoch"] < steps_this_epoch:
            tic = time.perf_counter()
            micro = [next(batches) for _ in range(micro_per_step)]
            result = train_step(train_net, micro, optimizer, device=device, amp_dtype=amp_dtype, scaler=scaler,
                                channels_last=config.channels_last, class_weights=class_weights,
                                loss_reduction=config.loss_reduction,
                                no_sync=train_net.no_sync if ctx.enabled else None, compute_loss=compute_loss)
            scheduler.step()
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            state["epoch_loss_sum"] += result.loss * result.images
            state["epoch_images"] += result.images
            rate = result.images * ctx.world_size / max(time.perf_counter() - tic, 1e-9)
            lr = optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            if writer is not None:
                writer.add_scalar("train/loss", result.loss, state["global_step"])
                writer.add_scalar("train/lr", lr, state["global_step"])
            state["train_seconds"] = time.perf_counter() - started
            if config.checkpoint_every and state["global_step"] % config.checkpoint_every == 0 and state["step_in_epoch"] < steps_this_epoch:
                if ctx.is_main:
                    save(last_path)
                barrier(ctx)
            if kill_after and state["global_step"] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        del batches, loader

        epoch_loss = all_reduce_mean(state["epoch_loss_sum"] / max(state["epoch_images"], 1), ctx, device)
        record: dict[str, Any] = {"epoch": epoch + 1, "iteration": state["global_step"], "train_loss": epoch_loss,
                                  "lr": optimizer.param_groups[0]["lr"], "time_s": round(state["train_seconds"], 1)}
        last_epoch = state["global_step"] >= total_steps
        if (epoch + 1) % config.eval_every == 0 or last_epoch:
            eval_loader = DataLoader(val_set, batch_sampler=val_batches, num_workers=config.workers)
            metrics, matrix, val_loss = evaluate(net.module if ctx.enabled else net, eval_loader, num_classes,
                                                 device=device, predict=predict_fn, amp_dtype=amp_dtype,
                                                 channels_last=config.channels_last, reduce_across_ranks=ctx.enabled)
            final_metrics = metrics.as_dict(classes)
            record.update({"val_loss": val_loss, "pixel_acc": metrics.pixel_acc, "mean_acc": metrics.mean_acc,
                           "miou": metrics.miou, "fwiou": metrics.fwiou})
            if ctx.is_main:
                print(f"epoch {epoch + 1}: train loss {epoch_loss:.4f}  val loss {val_loss:.4f}  "
                      f"pixel acc {metrics.pixel_acc:.4f}  mIoU {metrics.miou:.4f}")
                if last_epoch:
                    print(format_metrics_table(metrics, classes))
                    from fcnseg.visualize import plot_confusion_matrix

                    plot_confusion_matrix(matrix.matrix.cpu().numpy(), classes, out / "confusion.png")
        state["history"].append(record)
        state.update({"epoch": epoch + 1, "step_in_epoch": 0, "epoch_loss_sum": 0.0, "epoch_images": 0})
        if ctx.is_main:
            _log_line(out / "metrics.jsonl", record)
            for key in ("val_loss", "pixel_acc", "miou", "fwiou", "mean_acc"):
                if key in record:
                    writer.add_scalar(f"val/{key}", record[key], state["global_step"])
            writer.add_scalar("train/epoch_loss", epoch_loss, state["global_step"])
            if "miou" in record and record["miou"] > state["best_miou"]:
                state["best_miou"] = record["miou"]
                save(best_path, final_metrics)
            if (epoch + 1) % config.save_every == 0 or last_epoch:
                save(last_path, final_metrics)
            if "miou" in record:  # plotting costs a fraction of a second: only with new metrics
                from fcnseg.visualize import plot_curves

                plot_curves(state["history"], out / "curves.png")
        barrier(ctx)
        if on_epoch_end is not None:
            on_epoch_end(dict(record))

    if writer is not None:
        writer.close()
        if final_metrics is not None:
            (out / "metrics.json").write_text(json.dumps(final_metrics, indent=2))
    return TrainResult(out_dir=out, last_checkpoint=last_path, best_checkpoint=best_path if best_path.exists() else None,
                       best_miou=state["best_miou"], final_metrics=final_metrics, history=state["history"],
                       train_seconds=state["train_seconds"])


def _check_resumable(checkpoint: dict[str, Any], config: TrainConfig, classes: list[str]) -> None:
    """Refuses to resume from a checkpoint of another model, dataset or recipe."""
    for key in ("optimizer", "scheduler", "rng", "epoch", "global_step", "config"):
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint has no {key!r}: it is not a training checkpoint and cannot be resumed")
    saved = checkpoint["config"]
    for key in ("model", "variant", "upsampler", "batch_size", "accumulate", "optimizer", "seed", "dataset"):
        if saved.get(key) != getattr(config, key):
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained with {key}={saved.get(key)!r}, this run asks for "
                f"{getattr(config, key)!r} (use another --out to start a new run)"
            )
    if list(checkpoint["classes"]) != classes:
        raise CheckpointError("cannot resume: the checkpoint's classes differ from this dataset's")


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, for YAML and weights_only checkpoints."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
