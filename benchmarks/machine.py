"""The machine the benchmark runs on: its description (CPU, flags, native bf16, load) and the
``machine`` case, which measures its practical convolution peak and counts both models' FLOPs.

The report compares every throughput with this peak, so that a figure reads the same on another CPU.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

from chapter_baseline import build_baseline, d2l_loss, fcnseg_from_baseline
from configurations import NUM_CLASSES
from measuring import peak_rss_mb, setup_process, timed


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, the flags that matter here, torch and Python versions, the date and the load average."""
    import torch

    from fcnseg.runtime import cpu_flags

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
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg(),
    }


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
