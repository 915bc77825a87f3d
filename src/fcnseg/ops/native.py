"""fcnseg's one compiled kernel: the fused loss's softmax and gradient, built on first use.

The fused loss (`fcnseg.ops.fused_loss`) runs its per-pixel softmax, cross-entropy and gradient in
eager torch operations, eight passes over the logits; on CPUs with AVX-512 and native bf16 this
kernel does the same in one pass: a cached frozen-backbone training step takes about a fifth less
time (measured alternating both paths in one process). torch offers no such fused operation, hence C++ (src/fcnseg/ops/csrc/softmax_grad.cpp),
compiled with torch's own extension builder the first time it is needed (about 30 s, once per
machine; later runs load it from torch's extension cache).

Where it cannot be built (another CPU, no C++ compiler or ninja, or ``FCNSEG_NATIVE=0`` in the
environment), `softmax_grad_kernel` returns None and the eager path runs, with the same results
up to float rounding.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

from fcnseg.runtime import cpu_flags

SOURCE = Path(__file__).with_name("csrc") / "softmax_grad.cpp"
# The instructions the kernel uses; "avx512_bf16" for the bf16 conversion, which only CPUs that
# run fcnseg's bf16 path (native bf16) need anyway.
REQUIRED_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"})
_NAME = "fcnseg_softmax_grad"
# -fopenmp: at::parallel_for is OpenMP inline code, serial without it; the module then binds to the
# libgomp torch has already loaded (same soname), so there is one thread pool, torch's.
_COMPILE_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
_LINK_FLAGS = ["-fopenmp"]


def native_unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, or None if it can be tried."""
    if os.environ.get("FCNSEG_NATIVE", "1") == "0":
        return "disabled by FCNSEG_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU, this is {platform.machine()}"
    missing = REQUIRED_CPU_FLAGS - cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (set CXX or install g++)"
    if not _builder().is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _builder() -> ModuleType:
    """torch.utils.cpp_extension, imported without the CUDA_HOME notice it logs on CPU-only machines."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    return cpp_extension


def _already_built(cpp_extension: ModuleType) -> bool:
    """Whether torch's extension cache holds a build (then loading takes a second, not a compile)."""
    try:  # a private helper of torch's; if it moves, the message just says "compiling" every time
        build_dir = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
    except Exception:
        return False
    return any(build_dir.glob("*.so"))


@functools.cache
def softmax_grad_kernel() -> ModuleType | None:
    """The compiled kernel module (``softmax_cross_entropy_grad_``), or None where it cannot be built."""
    if native_unavailable_reason() is not None:
        return None
    cpp_extension = _builder()
    if not _already_built(cpp_extension):
        print("fcnseg: compiling the fused loss's softmax kernel for this CPU (once, about 30 s)...",
              file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name=_NAME, sources=[str(SOURCE)], extra_cflags=_COMPILE_FLAGS,
                                  extra_ldflags=_LINK_FLAGS, verbose=False)
    except Exception as error:  # a broken toolchain must not stop training: the eager path runs
        warnings.warn(f"fcnseg: could not build the fused loss's softmax kernel ({error}); "
                      "using the eager path (same results, slower)", RuntimeWarning, stacklevel=2)
        return None


__all__ = ["softmax_grad_kernel", "native_unavailable_reason", "REQUIRED_CPU_FLAGS", "SOURCE"]
