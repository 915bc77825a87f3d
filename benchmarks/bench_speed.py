"""Speed of fcnseg against the d2l chapter's FCN, measured in one run on this machine.

    python benchmarks/bench_speed.py                  # full run (10-15 minutes), writes docs/BENCHMARKS.md
    python benchmarks/bench_speed.py --rounds 3       # each configuration 3 times, round-robin: medians
    python benchmarks/bench_speed.py --quick          # tiny sizes, under a minute: a smoke test
    python benchmarks/bench_speed.py --only infer,train --out /tmp/b.md

The baseline is the chapter's code path as written, built inline here: ResNet-18's children up to
layer4, a 1x1 ``final_conv`` and ``nn.ConvTranspose2d(21, 21, 64, padding=16, stride=32)`` with the
bilinear initialisation, float32, NCHW, eager; its training step is SGD (lr 1e-3, weight decay 1e-3)
on ``F.cross_entropy(reduction='none').mean(1).mean(1)`` summed, plus the chapter's accuracy count.
Its transposed convolution's bias (which the chapter leaves at its random initialisation, and which
fcnseg's upsampler, like the FCN paper's, does not have) is set to zero, so that both models compute
the same function from the same weights; this does not change its speed.

Every configuration runs in its own subprocess (``--case``), so that its peak resident memory
(``ru_maxrss``) is its own and process-wide settings (threads, the allocator) do not leak between
them. Times are medians of several repeats after warm-up. The machine may be shared: the report
records the load average before and after the run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21
MARK = "BENCH-RESULT "

FULL: dict[str, Any] = {
    "size": [320, 480], "batches": [1, 8], "train_batch": 8, "repeats": 5, "warmup": 2, "train_repeats": 3,
    "curve_steps": 20, "curve_batch": 4, "curve_lr": 0.001, "epoch_images": 24, "epoch_batch": 8, "epoch_repeats": 2,
    "image_size": [360, 480], "sliding_image": [375, 500], "peak_conv": [4, 256, 56, 56], "compile": True,
}
QUICK: dict[str, Any] = {
    "size": [64, 96], "batches": [1, 2], "train_batch": 2, "repeats": 2, "warmup": 1, "train_repeats": 2,
    "curve_steps": 3, "curve_batch": 2, "curve_lr": 0.001, "epoch_images": 4, "epoch_batch": 2, "epoch_repeats": 1,
    "image_size": [72, 96], "sliding_image": [75, 100], "peak_conv": [1, 32, 28, 28], "compile": False,
}

# Inference configurations: (name, description). The baselines run with glibc's default
# allocator; fcnseg's with `fcnseg.runtime.keep_freed_memory`.
INFER_CONFIGS = {
    "baseline": "chapter model under torch.no_grad (the reference for ratios)",
    "baseline-as-written": "the same, recording autograd as the chapter's predict() does",
    "fp32": "fcnseg FCN-32s, fp32 NCHW, inference_mode",
    "fp32-cl": "+ channels_last",
    "fp32-cl-fold": "+ BatchNorm folded into the convs: fcnseg's inference form, what `Segmenter`, `fcnseg predict` "
                    "and `fcnseg eval` run",
    "fp32-cl-jit": "+ body traced, torch.jit.freeze + optimize_for_inference (oneDNN fusion)",
    "compile": "+ torch.compile (inductor, freezing)",
    "bf16-cl": "channels_last + bf16 autocast (the upsampler in bf16 too where bf16 is native)",
    "bf16-cl-fold": "+ BatchNorm folded into the convs: what `Segmenter` and `fcnseg predict/eval --amp auto` run",
    "bf16-compile": "bf16 autocast + torch.compile (inductor, freezing)",
}
BF16_INFER = ("bf16-cl", "bf16-cl-fold", "bf16-compile")
TRAIN_CONFIGS = {
    "baseline": "chapter's step as written (SGD, d2l loss, accuracy count)",
    "baseline-alloc": "the same, with fcnseg.runtime.keep_freed_memory",
    "fp32": "fcnseg train_step, fp32 NCHW, foreach SGD",
    "fp32-cl": "+ channels_last",
    "compile": "+ torch.compile of the model (inductor)",
    "fp32-cl-fused": "channels_last + the last upsampling fused with the loss: the step `fcnseg train` runs on CPUs "
                     "without native bf16",
    "bf16-cl": "channels_last + bf16 autocast (what `--amp auto` picks on CPUs with native bf16)",
    "bf16-cl-fused": "+ the last upsampling fused with the loss: the step `fcnseg train` runs on CPUs with native bf16",
}
BF16_TRAIN = ("bf16-cl", "bf16-cl-fused")
# Configurations measured only with bf16 (--bf16): emulated bf16 is several times slower than fp32, so
# on CPUs without it they would add half an hour to a run and only show that.
BF16_CONFIGS = {"infer": BF16_INFER, "train": BF16_TRAIN, "epoch": ("cached-fused-bf16",), "upsampler": ("fcnseg-bf16",)}


# --------------------------------------------------------------------------- shared helpers


def build_baseline(seed: int = 0):
    """The chapter's FCN exactly as d2l builds it (random body weights: nothing is downloaded)."""
    import torch
    import torchvision
    from torch import nn

    from fcnseg.models.upsample import bilinear_kernel

    torch.manual_seed(seed)
    pretrained_net = torchvision.models.resnet18()
    net = nn.Sequential(*list(pretrained_net.children())[:-2])
    net.add_module("final_conv", nn.Conv2d(512, NUM_CLASSES, kernel_size=1))
    net.add_module("transpose_conv", nn.ConvTranspose2d(NUM_CLASSES, NUM_CLASSES, kernel_size=64, padding=16, stride=32))
    net.transpose_conv.weight.data.copy_(bilinear_kernel(NUM_CLASSES, NUM_CLASSES, 64))
    nn.init.zeros_(net.transpose_conv.bias)  # see the module docstring
    return net, pretrained_net


def fcnseg_from_baseline(net, pretrained_net, **kwargs):
    """fcnseg's FCN-32s holding the baseline's weights."""
    import fcnseg

    model = fcnseg.fcn_resnet18(variant="32s", num_classes=NUM_CLASSES, weights_backbone=None, **kwargs)
    model.backbone.load_torchvision_state_dict(pretrained_net.state_dict())
    model.score32.load_state_dict(net.final_conv.state_dict())
    model.upsample_final.weight.data.copy_(net.transpose_conv.weight.data)
    return model


def d2l_loss(inputs, targets):
    import torch.nn.functional as F

    return F.cross_entropy(inputs, targets, reduction="none").mean(1).mean(1)


def d2l_accuracy(y_hat, y) -> float:
    y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


def timed(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timed_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """`timed` for several functions in turn, round after round, so that a slow spell of a shared
    machine lands on all of them alike (differences of a few percent are the point)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_merge(results: list[Any]) -> Any:
    """Several rounds' results of one case merged: numbers by their median, the rest from round one."""
    first = results[0]
    if isinstance(first, dict):
        return {key: median_merge([r[key] for r in results if isinstance(r, dict) and key in r]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(results)
    return first


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def setup_process(params: dict[str, Any], *, fast_allocator: bool) -> None:
    import torch

    torch.set_num_threads(params["threads"])
    if fast_allocator:
        from fcnseg.runtime import keep_freed_memory

        keep_freed_memory()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- cases (run in subprocesses)


def case_machine(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """Peak conv GFLOP/s in fp32 and bf16, and FLOP counts of both models."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    setup_process(params, fast_allocator=True)
    n, c, h, w = params["peak_conv"]
    out: dict[str, Any] = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(dtype=dtype, memory_format=torch.channels_last).eval()
        x = torch.randn(n, c, h, w).to(dtype=dtype, memory_format=torch.channels_last)
        with torch.inference_mode():
            times = timed(lambda: conv(x), params["repeats"], params["warmup"])
        # a peak: the fastest repeat (the median over rounds then keeps one lucky round from counting)
        out[f"peak_{dtype_name}_gflops"] = 2 * n * c * c * 9 * h * w / min(times) / 1e9
    out["peak_shape"] = [n, c, h, w]

    net, tv = build_baseline()
    model = fcnseg_from_baseline(net, tv)
    x = torch.randn(1, 3, *params["size"])
    y = torch.randint(0, NUM_CLASSES, (1, *params["size"]))
    for name, m in (("baseline", net), ("fcnseg", model)):
        m.eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            m(x)
        out[f"{name}_forward_gflop"] = counter.get_total_flops() / 1e9
        out[f"{name}_forward_breakdown"] = {str(k): v / 1e9 for k, v in counter.get_flop_counts()["Global"].items()}
        m.train()
        counter = FlopCounterMode(display=False)
        with counter:
            d2l_loss(m(x), y).sum().backward()
        out[f"{name}_train_gflop"] = counter.get_total_flops() / 1e9
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _infer_model(config: str, params: dict[str, Any]):
    """(model, seconds spent preparing it) for one inference configuration."""
    import torch

    from fcnseg.models.inference_form import inference_form

    net, tv = build_baseline()
    fitted = Path(params["workdir"]) / "fitted_baseline.pt"
    if fitted.exists():  # the curve case's fit; the body modules are shared with `tv`
        net.load_state_dict(torch.load(fitted, weights_only=True))
    if config.startswith("baseline"):
        return net.eval(), 0.0
    model = fcnseg_from_baseline(net, tv).eval()
    del net, tv
    if config == "fp32":
        return model, 0.0
    model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    if config in ("fp32-cl-fold", "bf16-cl-fold"):
        model = inference_form(model, copy_model=False)
    elif config == "fp32-cl-jit":
        example = torch.randn(1, 3, *params["size"]).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            traced = torch.jit.trace(model.backbone, example)
            model.backbone = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    elif config in ("compile", "bf16-compile"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-folds BatchNorm into prepacked oneDNN weights
        model = torch.compile(model, dynamic=False)
    return model, time.perf_counter() - start


def case_infer(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """Images/s and argmax agreement with the fp32 baseline for inference configurations."""
    import torch

    workdir = Path(params["workdir"])
    results: dict[str, Any] = {}
    for config in configs:
        setup_process(params, fast_allocator=not config.startswith("baseline"))
        model, prepare_s = _infer_model(config, params)
        channels_last = config not in ("fp32",) and not config.startswith("baseline")
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if config in BF16_INFER else contextlib.nullcontext
        grad = torch.enable_grad if config == "baseline-as-written" else (torch.no_grad if config == "baseline" else torch.inference_mode)
        entry: dict[str, Any] = {"prepare_s": prepare_s, "batches": {}}
        scenes = workdir / "scene_images.pt"
        images = torch.load(scenes) if scenes.exists() else None
        for batch in params["batches"]:
            g = torch.Generator().manual_seed(1)
            x = images[:batch].clone() if images is not None else torch.randn(batch, 3, *params["size"], generator=g)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            compile_s = 0.0
            # The autograd-recording row (and bf16 where it is emulated) is slow and only there for the record.
            slow = config == "baseline-as-written" or (config in BF16_INFER and not native_bf16())
            repeats, warmup = (params["repeats"] // 2 + 1, 1) if slow else (params["repeats"], params["warmup"])
            with grad(), autocast():
                if config in ("compile", "bf16-compile"):  # the first call compiles for this shape
                    start = time.perf_counter()
                    model(x)
                    compile_s = time.perf_counter() - start
                times = timed(lambda: model(x), repeats, warmup)
                pred = model(x).float().argmax(1)
            ref_path = workdir / f"ref_b{batch}.pt"
            if config == "baseline":
                torch.save(pred, ref_path)
            agreement = float((pred == torch.load(ref_path)).float().mean()) if ref_path.exists() else float("nan")
            entry["batches"][str(batch)] = {"images_per_s": batch / median(times), "median_s": median(times),
                                            "agreement": agreement, "compile_s": compile_s}
        entry["peak_rss_mb"] = peak_rss_mb()
        entry["fitted"] = images is not None
        results[config] = entry
        del model
    return results


def native_bf16() -> bool:
    from fcnseg.runtime import native_cpu_bf16

    return native_cpu_bf16()


def case_train(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """Seconds per training step (batch ``train_batch``, full fine-tuning) per configuration."""
    import torch

    from fcnseg.models.layout import to_channels_last
    from fcnseg.training.loss import fcn_cross_entropy
    from fcnseg.training.step import train_step

    results: dict[str, Any] = {}
    batch = params["train_batch"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, *params["size"], generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch, *params["size"]), generator=g)
    for config in configs:
        setup_process(params, fast_allocator=config != "baseline")
        net, tv = build_baseline()
        compile_s = 0.0
        if config.startswith("baseline"):
            trainer = torch.optim.SGD(net.parameters(), lr=1e-3, weight_decay=1e-3)

            def step() -> None:
                net.train()
                trainer.zero_grad()
                pred = net(x)
                loss = d2l_loss(pred, y)
                loss.sum().backward()
                trainer.step()
                d2l_accuracy(pred, y)
        else:
            model = fcnseg_from_baseline(net, tv)
            del net, tv
            channels_last = config != "fp32"
            amp = torch.bfloat16 if config.startswith("bf16") else None
            if channels_last:
                to_channels_last(model)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                        weight_decay=1e-3, foreach=True)
            runner = model
            if config == "compile":
                runner = torch.compile(model, dynamic=False)
            model.train()

            fused = (functools.partial(fcn_cross_entropy, model, reduction="d2l") if config.endswith("-fused")
                     else None)

            def step() -> None:
                train_step(runner, [(x, y)], optimizer, device=torch.device("cpu"), channels_last=channels_last,
                           amp_dtype=amp, loss_reduction="d2l", compute_loss=fused)

            if config == "compile":
                start = time.perf_counter()
                step()
                compile_s = time.perf_counter() - start
        times = timed(step, params["train_repeats"], params["warmup"])
        results[config] = {"images_per_s": batch / median(times), "median_s": median(times), "compile_s": compile_s,
                           "peak_rss_mb": peak_rss_mb()}
    return results


def scene_batches(params: dict[str, Any], count: int, batch: int, seed: int):
    """``count`` batches of random ``size`` crops of the synthetic scenes (normalised, void read as
    background as the chapter's reader does), the same for every configuration."""
    import torch

    from fcnseg.data.samplers import SeededTransformDataset

    views = SeededTransformDataset(_epoch_dataset(params), VoidAsBackground(tuple(params["size"])), seed=seed)
    samples = []
    for i in range(count * batch):
        views.set_epoch(i // len(views))
        samples.append(views[i % len(views)])
    return [(torch.stack([s[0] for s in samples[b * batch:(b + 1) * batch]]),
             torch.stack([s[1] for s in samples[b * batch:(b + 1) * batch]]).long()) for b in range(count)]


def case_curve(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """A short real fit on the scenes from the same weights and batches: the chapter's step against
    fcnseg's fused fp32 and bf16 steps. It also leaves the baseline's fitted weights for the inference
    case, whose argmax agreement means more on a model that has learned something than on random
    weights, where most pixels are near-ties between classes."""
    import torch

    from fcnseg.models.layout import to_channels_last
    from fcnseg.training.loss import fcn_cross_entropy
    from fcnseg.training.step import train_step

    setup_process(params, fast_allocator=True)
    batch, steps, lr = params["curve_batch"], params["curve_steps"], params["curve_lr"]
    data = scene_batches(params, steps, batch, seed=3)
    net, tv = build_baseline()
    fp32 = to_channels_last(fcnseg_from_baseline(net, tv))
    bf16 = to_channels_last(fcnseg_from_baseline(net, tv))
    net.transpose_conv.bias.requires_grad_(False)  # stays zero: fcnseg's upsampler has no bias
    trainer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=1e-3)
    optimizers = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=1e-3,
                                        foreach=True) for name, m in (("fp32", fp32), ("bf16", bf16))}
    losses: dict[str, list[float]] = {"baseline": [], "fcnseg": [], "fcnseg-bf16": []}
    runs = (("fcnseg", "fp32", fp32, None),) + ((("fcnseg-bf16", "bf16", bf16, torch.bfloat16),) if params["bf16"] else ())
    for x, y in data:
        net.train()
        trainer.zero_grad()
        loss = d2l_loss(net(x), y)
        loss.sum().backward()
        trainer.step()
        losses["baseline"].append(float(loss.sum()))
        for key, name, model, amp in runs:
            model.train()
            # The step `fcnseg train` takes: the last upsampling fused with the loss.
            fused = functools.partial(fcn_cross_entropy, model, reduction="d2l")
            result = train_step(model, [(x, y)], optimizers[name], device=torch.device("cpu"), channels_last=True,
                                amp_dtype=amp, loss_reduction="d2l", compute_loss=fused)
            losses[key].append(result.loss)

    def rel(key: str) -> list[float]:
        return [abs(a - b) / abs(a) for a, b in zip(losses["baseline"], losses[key])]

    workdir = Path(params["workdir"])
    torch.save(net.state_dict(), workdir / "fitted_baseline.pt")
    torch.save(scene_batches(params, 1, max(params["batches"]), seed=5)[0][0], workdir / "scene_images.pt")
    result = {**losses, "max_rel_diff": max(rel("fcnseg")), "mean_rel_diff": statistics.fmean(rel("fcnseg")),
              "batch": batch, "lr": lr, "peak_rss_mb": peak_rss_mb()}
    if params["bf16"]:
        result.update(max_rel_diff_bf16=max(rel("fcnseg-bf16")), mean_rel_diff_bf16=statistics.fmean(rel("fcnseg-bf16")),
                      final_rel_diff_bf16=rel("fcnseg-bf16")[-1])
    return result


class VoidAsBackground:
    """The d2l crop, with the scenes' void boundary (255) read as background.

    The chapter's loss has no ignore index (its VOC reader maps the void border to class 0), so
    both sides of the epoch comparison train on the same labels without void.
    """

    def __init__(self, crop: tuple[int, int]) -> None:
        from fcnseg.data.transforms import d2l_transforms

        self.crop = d2l_transforms(crop_size=crop)

    def __call__(self, image, mask):
        image, mask = self.crop(image, mask)
        return image, mask.masked_fill(mask == 255, 0)

    def __repr__(self) -> str:
        return f"VoidAsBackground({self.crop})"


def _epoch_dataset(params: dict[str, Any], transforms=None):
    from fcnseg.data import build_dataset

    return build_dataset("folder", params["dataset_root"], "train", transforms=transforms)


def case_epoch(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """One epoch of frozen-backbone training: the chapter's loop, fcnseg uncached, fcnseg cached."""
    import torch
    from torch.utils.data import DataLoader

    from fcnseg.data.samplers import SeededTransformDataset
    from fcnseg.models.layout import to_channels_last
    from fcnseg.training.feature_cache import CachedFeatureHead, FeatureCache
    from fcnseg.training.step import train_step

    batch, crop = params["epoch_batch"], tuple(params["size"])
    cpu = torch.device("cpu")
    results: dict[str, Any] = {}
    for config in configs:
        setup_process(params, fast_allocator=config != "baseline")
        net, tv = build_baseline()
        if config == "baseline":
            # The chapter's model with the body frozen: no gradients, BatchNorm statistics fixed.
            for layer in list(net.children())[:-2]:
                layer.requires_grad_(False)
                layer.eval()
            trainer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-3)
            dataset = _epoch_dataset(params, VoidAsBackground(crop))
            torch.manual_seed(0)

            def epoch() -> None:
                for x, y in DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=1):
                    trainer.zero_grad()
                    pred = net(x)
                    loss = d2l_loss(pred, y)
                    loss.sum().backward()
                    trainer.step()
                    d2l_accuracy(pred, y)

            times = timed(epoch, params["epoch_repeats"], 1)
            results[config] = {"epoch_s": median(times), "images": len(dataset) // batch * batch}
        else:
            upsampler = "fixed" if config == "cached-fixed" else "bilinear"
            amp = torch.bfloat16 if "bf16" in config else None
            model = to_channels_last(fcnseg_from_baseline(net, tv, freeze_backbone=True, upsampler=upsampler))
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                        weight_decay=1e-3, foreach=True)
            views = SeededTransformDataset(_epoch_dataset(params), VoidAsBackground(crop), seed=0)
            entry: dict[str, Any] = {}
            if config == "uncached":
                def epoch() -> None:
                    model.train()
                    for x, y in DataLoader(views, batch_size=batch, shuffle=True, drop_last=True, num_workers=1):
                        train_step(model, [(x, y)], optimizer, device=cpu, channels_last=True, loss_reduction="d2l")
            else:
                start = time.perf_counter()
                cache = FeatureCache.build(model, views, 1, batch_size=batch, workers=1, channels_last=True)
                entry["build_s"] = time.perf_counter() - start
                entry["cache_mb"] = cache.nbytes / 2**20
                head = CachedFeatureHead(model, cache.size)
                cached = cache.dataset()

                # What `fcnseg train --freeze-backbone --cache-features V` runs: the last upsampling fused
                # with the loss (fcnseg.ops.fused_loss); "cached" is the plain module followed by the loss.
                fused = functools.partial(head.loss, reduction="d2l") if "fused" in config else None

                def epoch() -> None:
                    model.train()
                    for packed, y in DataLoader(cached, batch_size=batch, shuffle=True, drop_last=True):
                        train_step(head, [(packed, y)], optimizer, device=cpu, channels_last=True, amp_dtype=amp,
                                   loss_reduction="d2l", compute_loss=fused)
            repeats = params["epoch_repeats"] if config == "uncached" else 2 * params["epoch_repeats"] + 1
            times = timed(epoch, repeats, 1)
            entry.update({"epoch_s": median(times), "images": len(views) // batch * batch})
            results[config] = entry
        results[config]["peak_rss_mb"] = peak_rss_mb()
    return results


def case_upsampler(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """The upsampler's share of forward time: baseline ConvTranspose2d against fcnseg's."""
    import torch

    results: dict[str, Any] = {}
    for config in configs:
        setup_process(params, fast_allocator=config != "baseline")
        net, tv = build_baseline()
        entry: dict[str, Any] = {}
        for batch in params["batches"]:
            x = torch.randn(batch, 3, *params["size"])
            if config == "baseline":
                model, upsampler = net.eval(), net.transpose_conv
                body = torch.nn.Sequential(*list(net.children())[:-1])
                grad = torch.no_grad
            else:
                model = fcnseg_from_baseline(net, tv).eval().to(memory_format=torch.channels_last)
                upsampler = model.upsample_final
                x = x.contiguous(memory_format=torch.channels_last)
                body = lambda image: model.score32(model.backbone(image)[2])  # noqa: E731
                grad = torch.inference_mode
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config == "fcnseg-bf16")
            with grad(), autocast:
                scores = body(x)
                total = median(timed(lambda: model(x), params["repeats"], params["warmup"]))
                up = median(timed(lambda: upsampler(scores), params["repeats"], params["warmup"]))
            entry[str(batch)] = {"forward_s": total, "upsampler_s": up, "share": up / total}
        entry["peak_rss_mb"] = peak_rss_mb()
        results[config] = entry
    return results


def case_sliding(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """Sliding-window prediction of one image: per window, against the same windows as one batch."""
    import torch

    from fcnseg.inference.windows import predict_sliding, predict_whole, window_grid

    setup_process(params, fast_allocator=True)
    net, tv = build_baseline()
    model = fcnseg_from_baseline(net, tv).eval().to(memory_format=torch.channels_last)
    height, width = params["sliding_image"]
    window = tuple(params["size"])
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(4))
    corners = window_grid(height, width, window, (math.ceil(window[0] * 2 / 3), math.ceil(window[1] * 2 / 3)))
    h, w = min(window[0], height), min(window[1], width)
    reps, warm = params["repeats"], params["warmup"]

    def plain() -> None:
        with torch.inference_mode():
            model(torch.stack([image[0, :, y:y + h, x:x + w] for y, x in corners]))

    times = timed_interleaved({"sliding": lambda: predict_sliding(model, image, window=window, batch_size=8),
                               "batch": plain, "whole": lambda: predict_whole(model, image)}, 2 * reps, warm)
    sliding, batch, whole = (median(times[k]) for k in ("sliding", "batch", "whole"))
    n = len(corners)
    return {"windows": n, "sliding_s": sliding, "batch_s": batch, "whole_s": whole, "per_window_sliding_s": sliding / n,
            "per_window_batch_s": batch / n, "overhead": sliding / batch - 1, "image": [height, width],
            "window": list(window), "peak_rss_mb": peak_rss_mb()}


CASES: dict[str, Callable[[dict[str, Any], list[str]], dict[str, Any]]] = {
    "machine": case_machine, "infer": case_infer, "train": case_train, "curve": case_curve,
    "epoch": case_epoch, "upsampler": case_upsampler, "sliding": case_sliding,
}


def case_batch(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """Several cases in one process (--quick: one interpreter start instead of seven)."""
    import traceback

    out: dict[str, Any] = {}
    for name, case_configs in params["runs"]:
        try:
            out[name] = CASES[name](params, case_configs)
        except Exception:  # reported like a failed subprocess
            out[name] = {"error": traceback.format_exc()}
    return out


# --------------------------------------------------------------------------- orchestration


def run_case(name: str, configs: list[str], params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs one case in a fresh interpreter and returns its result (or an error entry)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(params["threads"]), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--configs", ",".join(configs),
               "--params", json.dumps(params)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    elapsed = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
            result["_wall_s"] = elapsed
            return result
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"error": f"exit {proc.returncode}: {tail}"}


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    from fcnseg.ops.native import cpu_flags

    model, flags = platform.processor() or "unknown", cpu_flags()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    relevant = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    return {
        "cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in relevant}, "threads": threads,
        "torch": torch.__version__, "mkldnn_bf16": bool(bf16), "python": platform.python_version(),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg(),
    }


def plan(params: dict[str, Any], only: set[str] | None, quick: bool) -> list[tuple[str, list[str]]]:
    """(case, configs) per subprocess: one configuration each in a full run, one process per case in --quick."""
    infer = [c for c in INFER_CONFIGS if params["compile"] or "compile" not in c]
    train = [c for c in TRAIN_CONFIGS if params["compile"] or c != "compile"]
    cases = [("machine", ["all"]), ("curve", ["all"]), ("infer", infer), ("train", train),
             ("epoch", ["baseline", "uncached", "cached", "cached-fused", "cached-fused-bf16", "cached-fixed"]),
             ("upsampler", ["baseline", "fcnseg", "fcnseg-bf16"]),
             ("sliding", ["all"])]
    runs = []
    for name, configs in cases:
        if only and name not in only:
            continue
        if not params["bf16"]:
            configs = [c for c in configs if c not in BF16_CONFIGS.get(name, ())]
        if quick or name in ("machine", "curve", "sliding"):
            runs.append((name, configs))
        else:
            runs.extend((name, [c]) for c in configs)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (< 60 s): a smoke test")
    parser.add_argument("--out", help="markdown report (default docs/BENCHMARKS.md, or docs/BENCHMARKS-no-native-bf16.md on a CPU without native bf16; with --quick, none unless given)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores; 1 with --quick, which "
                        "measures nothing and should not depend on how busy the machine is)")
    parser.add_argument("--only", help="comma-separated cases: " + ",".join(CASES))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, round-robin, and report medians (default 1)")
    parser.add_argument("--bf16", choices=("auto", "always", "never"),
                        help="measure the bf16 configurations: auto (the default) where the CPU has native bf16 "
                        "(AVX-512 BF16 or AMX), always (also emulated, slowly: the default with --quick, which "
                        "runs every code path), never")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:  # inside a subprocess
        case = case_batch if args.case == "batch" else CASES[args.case]
        result = case(json.loads(args.params), args.configs.split(","))
        print(MARK + json.dumps(result))
        return 0

    params = dict(QUICK if args.quick else FULL)
    params["threads"] = args.threads or (1 if args.quick else os.cpu_count() or 1)
    if args.no_compile:
        params["compile"] = False
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(CASES):
        parser.error(f"unknown case(s) {', '.join(sorted(only - set(CASES)))}; choose from {', '.join(CASES)}")
    started = time.perf_counter()
    info = machine_info(params["threads"])
    bf16 = args.bf16 or ("always" if args.quick else "auto")
    params["bf16"] = bf16 == "always" or (bf16 == "auto" and bool(info["mkldnn_bf16"]))
    params["rounds"] = max(1, args.rounds)
    if params["bf16"]:
        # Built here, once, so that no timed subprocess compiles it (torch caches the build).
        from fcnseg.ops.native import native_unavailable_reason, softmax_grad_kernel

        reason = native_unavailable_reason()
        built = reason is None and softmax_grad_kernel() is not None
        info["softmax_kernel"] = ("compiled kernel (fcnseg.ops.native)" if built
                                  else f"eager torch operations ({reason or 'the kernel failed to build'})")
    # The targets were set for CPUs with native bf16; a run on another CPU gets a report of its own.
    default_out = REPO / "docs" / ("BENCHMARKS.md" if info["mkldnn_bf16"] else "BENCHMARKS-no-native-bf16.md")
    out = Path(args.out) if args.out else (None if args.quick else default_out)
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--out" in shown:  # where the report goes is not how it was measured
        del shown[shown.index("--out"):shown.index("--out") + 2]
    info["args"] = "".join(f" {a}" for a in shown if not a.startswith("--out="))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fcnseg-bench-") as workdir:
        params["workdir"] = workdir
        runs = plan(params, only, args.quick)
        if any(name in ("epoch", "curve") for name, _ in runs):
            params["dataset_root"] = str(make_epoch_dataset(Path(workdir), params))
        if args.quick:
            print(f"one process: {', '.join(name for name, _ in runs)}", flush=True)
            batch = run_case("batch", ["-"], dict(params, runs=runs), timeout=120)
            outcomes = [(name, configs, batch.get(name, batch)) for name, configs in runs]
        else:
            # With --rounds N every timed configuration runs N times, round-robin, each in its own
            # process, and the report takes the median over rounds: configurations compared in a
            # ratio then share the machine's slow and fast spells (measured here: +-30% over minutes).
            # The peak is measured every round too: one measurement in a slow spell would misstate
            # every "% of peak" in the report.
            schedule = runs * params["rounds"]
            rounds: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
            for name, configs in schedule:
                print(f"[{time.perf_counter() - started:6.1f} s] {name}: {', '.join(configs)}", flush=True)
                rounds.setdefault((name, tuple(configs)), []).append(run_case(name, configs, params, timeout=600))
            outcomes = []
            for (name, configs), measured in rounds.items():
                good = [m for m in measured if "error" not in m]
                outcomes.append((name, list(configs), median_merge(good) if good else measured[0]))
        for name, configs, result in outcomes:
            if "error" in result:
                print(f"    {name} failed: {result['error']}", flush=True)
                results.setdefault(name, {})["_error_" + "+".join(configs)] = result["error"]
                continue
            result.pop("_wall_s", None)
            if name in ("machine", "curve", "sliding"):
                results[name] = result
            else:
                results.setdefault(name, {}).update(result)
    info["load_after"] = os.getloadavg()
    info["total_s"] = time.perf_counter() - started
    from report import render  # benchmarks/report.py, beside this file

    text = render(results, info, params, quick=args.quick)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}")
    return 0


def make_epoch_dataset(workdir: Path, params: dict[str, Any]) -> Path:
    """A folder dataset of procedural scenes, VOC-like in size, for the epoch measurements."""
    sys.path.insert(0, str(REPO / "src"))
    from fcnseg.data.synthetic import make_synthetic

    # train.txt receives 4 of every 5 scenes.
    n = math.ceil(params["epoch_images"] * 5 / 4)
    return make_synthetic(workdir / "scenes", num_classes=NUM_CLASSES, n=n, size=tuple(params["image_size"]), seed=0,
                          progress=False)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
