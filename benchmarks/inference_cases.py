"""The inference cases: images/s of every inference configuration (with its argmax agreement with
the chapter's model), the upsampler's share of a forward pass, and the sliding-window overhead.

Each ``case_*`` function runs inside a case process (see case_runner.py), takes the run's parameters
and the configurations to measure, and returns a JSON-able result.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

from chapter_baseline import build_baseline, fcnseg_from_baseline
from configurations import BF16_INFER
from measuring import median, native_bf16, peak_rss_mb, setup_process, timed, timed_interleaved


def _infer_model(config: str, params: dict[str, Any]) -> tuple[Any, float]:
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
    # One configuration per call: its model is freed when the call returns, before the next is built.
    return {config: _infer_config(config, params) for config in configs}


def _infer_config(config: str, params: dict[str, Any]) -> dict[str, Any]:
    """One inference configuration at every batch size of the run."""
    import torch

    workdir = Path(params["workdir"])
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
    return entry


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
                body = lambda image: model.score32(model.backbone(image)[-1])  # noqa: E731
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
