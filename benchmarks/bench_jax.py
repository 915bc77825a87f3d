"""JAX (jit-compiled Flax) against fcnseg's PyTorch paths on the same CPU, in one run: inference and a training step.

    python benchmarks/bench_jax.py                                   # MobileNetV2 and ResNet-18 FCN-8s, 320x480
    python benchmarks/bench_jax.py --models fcn_resnet18:32s --batch 8 --repeats 10
    python benchmarks/bench_jax.py --quick                           # tiny sizes: a smoke test, measures nothing

Inference: the PyTorch model in the form `Segmenter` predicts with (BatchNorm folded, channels-last,
float32) against the "jax" engine built from it (`fcnseg.jax_backend.engine`), both called on the
same normalised batch; the JAX time includes the torch <-> NumPy copies the engine makes. Training
step: fcnseg's `train_step` (float32, channels-last, the fused last upsampling + loss) against the
JAX step (`fcnseg.jax_backend.step`: gradients with BatchNorm in training mode, then the SGD update).
Times are medians after warm-up (which includes JAX's compilation, reported apart). Prints a markdown
table; ``--out FILE`` writes it too.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _timed(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of ``repeats`` calls after ``warmup`` more)."""
    tic = time.perf_counter()
    fn()
    first = time.perf_counter() - tic
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return first, statistics.median(times)


def _model(name: str, variant: str, classes: int) -> torch.nn.Module:
    from fcnseg.models import build_model

    torch.manual_seed(0)
    return build_model(name, variant=variant, num_classes=classes, weights_backbone=None)


def bench_inference(name: str, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows for the PyTorch inference form and the JAX engine on one batch."""
    from fcnseg.inference.backends import EngineRequest
    from fcnseg.jax_backend.engine import jax_engine
    from fcnseg.models.inference_form import inference_form

    model = inference_form(_model(name, variant, args.classes).eval())
    image = torch.randn(args.batch, 3, *args.size)
    engine = jax_engine(EngineRequest(model, torch.device("cpu"), None))
    rows = []
    for label, fn in (("torch (inference form, fp32)", lambda: model(image)), ("jax (jit, fp32)", lambda: engine(image))):
        with torch.inference_mode():
            first, median = _timed(fn, args.repeats, args.warmup)
        rows.append({"what": "inference", "model": f"{name} {variant}", "path": label, "first_s": first,
                     "ms_per_image": 1000 * median / args.batch})
    return rows


def bench_training(name: str, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows for fcnseg's PyTorch training step and the JAX one, SGD momentum 0.9, wd 1e-4."""
    import functools

    from fcnseg.jax_backend.convert import from_torch_model
    from fcnseg.jax_backend.step import TrainStep
    from fcnseg.models.layout import to_channels_last
    from fcnseg.training.loss import fcn_cross_entropy
    from fcnseg.training.step import train_step

    model = _model(name, variant, args.classes).train()
    module, variables = from_torch_model(model)
    to_channels_last(model)
    image = torch.randn(args.batch, 3, *args.size)
    target = torch.randint(0, args.classes, (args.batch, *args.size))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True)
    loss = functools.partial(fcn_cross_entropy, model)
    step = TrainStep(module, "sgd", momentum=0.9, weight_decay=1e-4)
    state = {"params": variables["params"], "stats": variables["batch_stats"], "opt": step.init(variables["params"])}

    def torch_step() -> None:
        train_step(model, [(image, target)], optimizer, device=torch.device("cpu"), channels_last=True,
                   compute_loss=loss)

    def jax_step() -> None:
        out = step.gradients(state["params"], state["stats"], image.numpy(), target.numpy().astype(np.int32))
        state["stats"] = out.batch_stats
        state["params"], state["opt"] = step.apply(state["params"], state["opt"], out.grads, 1e-3)
        float(out.loss)  # waits for the step, as torch's loss.item() does

    rows = []
    for label, fn in (("torch (fcnseg train_step, fp32, fused loss)", torch_step), ("jax (jit, fp32)", jax_step)):
        first, median = _timed(fn, args.repeats, args.warmup)
        rows.append({"what": "training step", "model": f"{name} {variant}", "path": label, "first_s": first,
                     "ms_per_image": 1000 * median / args.batch})
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import jax

    from fcnseg.runtime import native_cpu_bf16

    lines = ["# JAX against PyTorch (benchmarks/bench_jax.py)", "",
             f"CPU: {_cpu_name()}, {torch.get_num_threads()} torch threads, "
             f"native bf16: {native_cpu_bf16()}; torch {torch.__version__}, jax {jax.__version__}; "
             f"batch {args.batch}, {args.size[0]}x{args.size[1]}, {args.classes} classes, median of {args.repeats} "
             f"after {args.warmup} warm-up calls (first call, with JAX's compilation, apart).", "",
             "| what | model | path | ms / image | first call s |", "|---|---|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['what']} | {row['model']} | {row['path']} | {row['ms_per_image']:.1f} | "
                     f"{row['first_s']:.2f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="fcn_mobilenet_v2:8s,fcn_resnet18:8s",
                        help="comma-separated NAME:VARIANT (default: %(default)s)")
    parser.add_argument("--size", default="320x480", help="HxW (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=21, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (default: %(default)s)")
    parser.add_argument("--only", choices=("inference", "training"), help="one of the two measurements")
    parser.add_argument("--quick", action="store_true", help="64x64, 1 repeat, MobileNetV2 32s: a smoke test")
    parser.add_argument("--out", help="also write the table to this markdown file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.models, args.size, args.repeats, args.warmup, args.classes = "fcn_mobilenet_v2:32s", "64x64", 1, 0, 3
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    rows: list[dict[str, Any]] = []
    for spec in args.models.split(","):
        name, variant = spec.split(":")
        if args.only in (None, "inference"):
            rows += bench_inference(name, variant, args)
        if args.only in (None, "training"):
            rows += bench_training(name, variant, args)
    text = render(rows, args)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
