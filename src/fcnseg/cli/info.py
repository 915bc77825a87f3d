"""`fcnseg info`: the models fcnseg builds, their sizes, and a forward pass on this machine."""
from __future__ import annotations

import argparse

from fcnseg.cli import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="list models and check a forward pass on this machine",
        formatter_class=options.DefaultsHelpFormatter,
        description="List fcnseg's models with their sizes and time a forward pass of each. Also says whether "
                    "this CPU has native bf16 and whether training uses the fused loss's compiled softmax "
                    "kernel (built once on first use; FCNSEG_NATIVE=0 in the environment turns it off).")
    parser.add_argument("--size", type=options.size, default=(320, 480), metavar="HxW",
                        help="input size for the forward check (default: 320x480)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from fcnseg import __version__
    from fcnseg.constants import DEFAULT_BACKEND
    from fcnseg.data import fast_png
    from fcnseg.inference.backends import auto_choice
    from fcnseg.models import VARIANTS, build_model, list_models
    from fcnseg.ops.native import native_unavailable_reason
    from fcnseg.runtime import native_cpu_bf16, resolve_amp_dtype, select_device

    h, w = args.size
    print(f"fcnseg {__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    reason = native_unavailable_reason()
    print(f"native bf16 on this CPU: {'yes' if native_cpu_bf16() else 'no'}; fused loss's compiled softmax kernel: "
          + ("used (built once on first use)" if reason is None else f"not used ({reason})"))
    device = select_device("auto")
    dtype = resolve_amp_dtype("auto", device)
    print(f"prediction by default (backend {DEFAULT_BACKEND}, amp auto): {auto_choice(device, dtype)} on {device}, "
          f"{str(dtype or torch.float32).removeprefix('torch.')}")
    print("PNG photos decoded by " + ("libspng (pyspng)" if fast_png.available() else
                                      "Pillow (pip install 'fcnseg[fast-png]' decodes them twice as fast)"))
    image = torch.randn(1, 3, h, w)
    for name in list_models():
        for variant in VARIANTS:
            model = build_model(name, variant=variant, weights_backbone=None).eval()
            params = sum(p.numel() for p in model.parameters()) / 1e6
            with torch.inference_mode():
                start = time.perf_counter()
                logits = model(image)
                elapsed = time.perf_counter() - start
            print(f"  {name:18s} {variant:3s} {params:6.2f} M params  logits {tuple(logits.shape)}  {elapsed * 1000:7.1f} ms")
    return 0
