"""The training cases: seconds per training step of every training configuration, a short fit whose
loss curves compare the chapter's step with fcnseg's, and one epoch of frozen-backbone training
(the chapter's loop, fcnseg uncached, fcnseg on cached features).

Each ``case_*`` function runs inside a case process (see case_runner.py), takes the run's parameters
and the configurations to measure, and returns a JSON-able result. The curve case also leaves the
fitted baseline and a batch of scene images in the run's work folder for the inference case.
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from chapter_baseline import VoidAsBackground, build_baseline, chapter_step, fcnseg_from_baseline
from configurations import NUM_CLASSES
from measuring import median, peak_rss_mb, setup_process, timed


def case_train(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """Seconds per training step (batch ``train_batch``, full fine-tuning) per configuration."""
    import torch

    from fcnseg.models.layout import to_channels_last
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
                chapter_step(net, trainer, x, y)
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

            fused = train_loss(config, model, runner)

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


def train_loss(config: str, model: Any, runner: Any) -> Callable[[Any, Any], Any] | None:
    """The step's loss of a training configuration: None for train_step's own (cross-entropy, unfused)."""
    from fcnseg.ops.losses import training_loss
    from fcnseg.training.loss import fcn_cross_entropy

    dice = "-dice" in config
    if config.endswith("-fused"):  # ce+dice as `fcnseg train` runs it: the mean over pixels, as unfused
        return functools.partial(fcn_cross_entropy, model, reduction="mean" if dice else "d2l", dice=dice)
    if dice:
        return lambda image, target: training_loss(runner(image), target, "ce+dice")
    return None


def epoch_dataset(params: dict[str, Any], transforms: Callable[..., Any] | None = None) -> Any:
    """The run's synthetic scenes (made by the runner) as fcnseg's folder dataset, train split."""
    from fcnseg.data import build_dataset

    return build_dataset("folder", params["dataset_root"], "train", transforms=transforms)


def scene_batches(params: dict[str, Any], count: int, batch: int, seed: int) -> list[tuple[Any, Any]]:
    """``count`` batches of random ``size`` crops of the synthetic scenes (normalised, void read as
    background as the chapter's reader does), the same for every configuration."""
    import torch

    from fcnseg.data.samplers import SeededTransformDataset

    views = SeededTransformDataset(epoch_dataset(params), VoidAsBackground(tuple(params["size"])), seed=seed)
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
        loss = chapter_step(net, trainer, x, y, count_accuracy=False)
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


def case_epoch(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """One epoch of frozen-backbone training: the chapter's loop, fcnseg uncached, fcnseg cached."""
    results: dict[str, Any] = {}
    for config in configs:
        setup_process(params, fast_allocator=config != "baseline")
        # Both models stay alive to the end of the configuration, as in the chapter's script.
        net, tv = build_baseline()
        if config == "baseline":
            results[config] = _chapter_epoch(net, params)
        else:
            results[config] = _fcnseg_epoch(config, net, tv, params)
        results[config]["peak_rss_mb"] = peak_rss_mb()
    return results


def _chapter_epoch(net: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The chapter's training loop over the scenes, its body frozen."""
    import torch
    from torch.utils.data import DataLoader

    batch, crop = params["epoch_batch"], tuple(params["size"])
    # The chapter's model with the body frozen: no gradients, BatchNorm statistics fixed.
    for layer in list(net.children())[:-2]:
        layer.requires_grad_(False)
        layer.eval()
    trainer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-3)
    dataset = epoch_dataset(params, VoidAsBackground(crop))
    torch.manual_seed(0)

    def epoch() -> None:
        for x, y in DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=1):
            chapter_step(net, trainer, x, y)

    times = timed(epoch, params["epoch_repeats"], 1)
    return {"epoch_s": median(times), "images": len(dataset) // batch * batch}


def _fcnseg_epoch(config: str, net: Any, tv: Any, params: dict[str, Any]) -> dict[str, Any]:
    """fcnseg's frozen-backbone epoch: the body run every step ("uncached") or its features cached."""
    import torch
    from torch.utils.data import DataLoader

    from fcnseg.data.samplers import SeededTransformDataset
    from fcnseg.models.layout import to_channels_last
    from fcnseg.training.cached_head import CachedFeatureHead
    from fcnseg.training.feature_cache import FeatureCache
    from fcnseg.training.step import train_step

    batch, crop = params["epoch_batch"], tuple(params["size"])
    cpu = torch.device("cpu")
    upsampler = "fixed" if config == "cached-fixed" else "bilinear"
    amp = torch.bfloat16 if "bf16" in config else None
    model = to_channels_last(fcnseg_from_baseline(net, tv, freeze_backbone=True, upsampler=upsampler))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                weight_decay=1e-3, foreach=True)
    views = SeededTransformDataset(epoch_dataset(params), VoidAsBackground(crop), seed=0)
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
    return entry
