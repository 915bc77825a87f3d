"""A training step as `fcnseg train` runs it, against the same step with one speed-up undone.

    python benchmarks/bench_train_step.py                     # Q7's MobileNetV2 recipe on CamVid (5-10 min), alone
    python benchmarks/bench_train_step.py --steps 3 --rounds 2 -- --dataset folder --root DIR --crop 64x64 ...

The step is built as `fcnseg train` builds it (`fcnseg.training.trainer.Trainer` with the options
after ``--``, by default the recommended CamVid recipe of docs/RESULTS.md Q7, and the allocator
setting `fcnseg train` makes), on the same real batches. Each comparison alternates its two sides
round by round in this one process, so that a slow spell of a shared machine lands on both alike:

- depthwise: MobileNetV2's strided depthwise layers with the spread input gradient
  (`fcnseg.models.depthwise_conv`) against torch's own Conv2d;
- loss: the recipe's loss fused with the last upsampling (`fcn_cross_entropy`) against the
  unfused loss on the logits;
- data: a batch from the decoded pairs in memory (``--cache-images``) against a batch decoded
  from the files, with the recipe's augmentation (with ``--workers 0``, as Q7 trains, the step waits for it).

It prints the median seconds of each side and their ratio (> 1: the speed-up pays).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
Q7_MOBILENET = (
    "--model fcn_mobilenet_v2 --variant 4s --upsampler bilinear --weights-backbone {shared}/weights/"
    "mobilenet_v2_imagenet_features.pth --dataset camvid --root {shared}/camvid --scale-range 0.5 2.0 --hflip true "
    "--optimizer sgd --momentum 0.9 --crop 360x480 --batch-size 8 --lr 0.02 --weight-decay 0.0001 --schedule poly "
    "--warmup-iters 100 --iterations 3600 --seed 0 --workers 0 --no-progress --loss ce+dice"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps (or batches) per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each side once per round")
    parser.add_argument("train_options", nargs="*", help="fcnseg train options after -- (default: Q7's recipe)")
    return parser


def build_trainer(options: list[str], out: Path, stack: contextlib.ExitStack) -> Any:
    """The Trainer of ``fcnseg train OPTIONS`` with its data, model, optimiser and loss set up."""
    import torch

    from fcnseg.cli import build_parser as cli_parser
    from fcnseg.cli.train import config_from_args
    from fcnseg.runtime import keep_freed_memory
    from fcnseg.training.datasets import build_training_data
    from fcnseg.training.distributed import setup_distributed
    from fcnseg.training.rng import seed_everything
    from fcnseg.training.trainer import Trainer

    config = config_from_args(cli_parser().parse_args(["train", *options, "--out", str(out)])).validate()
    keep_freed_memory()
    trainer = Trainer(config, torch.device("cpu"), setup_distributed("cpu"), callbacks=[], progress=False, cleanup=stack)
    seed_everything(config.seed)
    trainer.data = build_training_data(config)
    trainer.set_up_model()
    trainer.set_up_optimisation()
    trainer.set_up_loss()
    trainer.model.train()
    return trainer


def alternate(sides: dict[str, Callable[[], None]], steps: int, rounds: int) -> dict[str, float]:
    """Median seconds of one call of each side, the sides alternating round by round after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for run in sides.values():
        run()
    for _ in range(rounds):
        for name, run in sides.items():
            for _ in range(steps):
                tic = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(values) for name, values in times.items()}


def depthwise_switch(model: Any) -> Callable[[bool], None]:
    """``switch(plain)``: turns the model's strided depthwise layers into torch's Conv2d, or back.

    Only the class changes (the parameters are the layer's own either way).
    """
    from torch import nn

    from fcnseg.models.depthwise_conv import StridedDepthwiseConv2d

    layers = [module for module in model.modules() if isinstance(module, StridedDepthwiseConv2d)]

    def switch(plain: bool) -> None:
        for layer in layers:
            layer.__class__ = nn.Conv2d if plain else StridedDepthwiseConv2d
    return switch


def report(name: str, fast: str, slow: str, seconds: dict[str, float]) -> None:
    print(f"{name}: {fast} {seconds[fast]:.3f} s, {slow} {seconds[slow]:.3f} s, ratio {seconds[slow] / seconds[fast]:.2f}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch
    from torch.utils.data import DataLoader

    from fcnseg.data.memory import InMemoryPairs
    from fcnseg.data.samplers import SeededTransformDataset
    from fcnseg.training.loss import logits_loss

    args = build_parser().parse_args(argv)
    options = args.train_options or Q7_MOBILENET.format(shared=REPO.parent / "shared" / "data").split()
    options = [option for option in options if option != "--cache-images"]  # measured here against files
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainer = build_trainer(options, Path(tmp) / "run", stack)
        config, data = trainer.config, trainer.data
        loader = DataLoader(data.train, batch_size=trainer.batch_size, shuffle=True, drop_last=True, num_workers=0)
        batches = list(itertools.islice(loader, max(2, args.steps)))
        print(f"{config.model} FCN-{config.variant}, loss {config.loss}, batch {tuple(batches[0][0].shape)}, "
              f"{torch.get_num_threads()} threads", flush=True)
        step = itertools.count()

        def train_step() -> None:
            trainer.train_step([batches[next(step) % len(batches)]])

        switch = depthwise_switch(trainer.model)

        def with_depthwise(plain: bool) -> Callable[[], None]:
            return lambda: (switch(plain), train_step())

        report("depthwise", "spread", "torch", alternate({"spread": with_depthwise(False), "torch": with_depthwise(True)},
                                                        args.steps, args.rounds))
        switch(False)
        fused, unfused = trainer.compute_loss, functools.partial(logits_loss, trainer.net, config.loss,
                                                                 class_weights=trainer.class_weights)

        def with_loss(loss: Any) -> Callable[[], None]:
            return lambda: (setattr(trainer, "compute_loss", loss), train_step())

        if fused is not None and getattr(fused, "func", None) is not logits_loss:
            report("loss", "fused", "unfused", alternate({"fused": with_loss(fused), "unfused": with_loss(unfused)},
                                                        args.steps, args.rounds))
        decoded = SeededTransformDataset(InMemoryPairs(data.raw_train), data.train.transforms, config.seed)
        index = itertools.count()

        def read(dataset: Any) -> Callable[[], None]:
            return lambda: [dataset[next(index) % len(dataset)] for _ in range(trainer.batch_size)]

        report("data", "in memory", "from files", alternate({"in memory": read(decoded), "from files": read(data.train)},
                                                           args.steps, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
