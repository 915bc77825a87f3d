"""What depends on the machine and the process: device choice, AMP policy, allocator, atomic writes.

- Devices: CUDA, then Apple MPS, then CPU; the CPU's flags, whether it computes bf16 natively and
  whether its int8 kernels can overflow on full-range 8-bit weights.
- AMP: which autocast dtype ``--amp auto`` means on a device.
- Allocator: `keep_freed_memory`, a process-wide glibc setting that only entry points call.
- Files: `atomic_write`, so a crash or kill mid-write leaves the previous file intact, and the
  file gets the permissions the umask gives any new file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from fcnseg.constants import AMP_CHOICES
from fcnseg.errors import OptionError


@functools.cache
def native_cpu_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX-512 BF16 or AMX), where oneDNN runs bf16 natively.

    Elsewhere bf16 is emulated and several times slower than float32 (measured 18.8 against 144
    GFLOP/s for a 3x3 convolution on an AVX2 EPYC), so automatic mixed precision stays off there.
    """
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported is not None and supported())


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_needs_reduced_range() -> bool:
    """True on x86 CPUs without VNNI (or where the flags cannot be read), where INT8 models need 7-bit weights.

    Without VNNI, x86 int8 convolutions (onnxruntime's, OpenVINO's) add pairs of uint8 x int8
    products in 16 bits, which full-range weights overflow: an INT8 export with 8-bit weights
    predicted the float32 class on 78% of CamVid pixels on an AVX2 EPYC, 97% with 7-bit weights
    (docs/ENGINES.md, "CPUs without VNNI"). VNNI (and AMX) accumulate in 32 bits; ARM's dot
    products do too.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags()


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """Resolves "auto" (or None) to the best available device; passes explicit names through.

    Raises:
        OptionError: (a ValueError) an explicit CUDA/MPS device was asked for but is not available,
            or the name is not a device; a usage error, so every command answers it the same way.
    """
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch: "Expected one of cpu, cuda, ... at start of device string"
        raise OptionError(f"unknown device {str(name)!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {str(name)!r} requested but CUDA is not available; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device {str(name)!r} requested but MPS is not available; use --device cpu or auto")
    return device


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` choice on a device.

    "auto" gives bf16 on CPUs with native bf16 (AVX-512 BF16/AMX) and bf16-capable GPUs, fp16 on
    other GPUs, and no autocast elsewhere; "bf16"/"fp16" force one; "none" disables autocast.

    Raises:
        OptionError: a choice other than those of `fcnseg.constants.AMP_CHOICES`.
    """
    if amp not in AMP_CHOICES:
        raise OptionError(f"unknown amp choice {amp!r}; choose one of {', '.join(AMP_CHOICES)}")
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if native_cpu_bf16() else None
    return None


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the device, or a no-op when AMP is off (None or float32)."""
    if amp_dtype is None or amp_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# Keeps freed CPU memory in the process, so large tensors stop paying for page faults.
#
# glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB) with a fresh
# ``mmap`` and returns it to the kernel on ``free``. A training step at batch 8 and 320x480 allocates
# and frees dozens of such blocks (the logits alone are 103 MB), so each one is faulted in page by
# page and zeroed by the kernel again: on a 2-core AVX2 machine, filling a new 100 MB tensor took
# 90 ms instead of 6 ms, and the FCN head's step spent most of its time there.
#
# `keep_freed_memory` switches glibc to serve large blocks from its heap and to keep freed memory
# for reuse. It changes speed only, never results; the process's resident size stays at its peak
# instead of shrinking between steps. It is a process-wide setting, so only entry points (the CLI,
# benchmarks) call it, never library code.

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Asks glibc not to ``mmap`` large blocks and to keep up to ``trim_threshold`` bytes freed.

    Args:
        trim_threshold: free memory at the top of the heap beyond which glibc gives memory back
            to the kernel (1 GiB by default: more than one training step's temporaries).

    Returns:
        True if the setting is in force (now or from an earlier call); False where it does not
        apply (not Linux with glibc), in which case nothing changed.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mmap_max 0: every block comes from the heap, so a freed block can serve the next request.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)))
    return _applied


def free_memory_bytes() -> int | None:
    """Free physical memory (not counting the page cache), or None where the platform does not say.

    The in-memory caches (decoded images, body features) refuse to fill more than part of it.
    """
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return None


def current_umask() -> int:
    """The process's file-mode creation mask (e.g. 0o022), read without changing it where possible.

    Linux reports it in /proc/self/status. Elsewhere the only way is to set a mask and put the old
    one back (``os.umask``): a file another thread creates in that instant gets the temporary mask
    0o022, the usual one, which is why it is the one set.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls ``write(file)`` on a temporary file and renames it to ``path`` once it is on disk.

    The file gets the permissions of any file the user creates (0o666 minus the umask, so
    usually 0644): ``mkstemp`` creates its temporary file 0600, private to the owner, which the
    rename would otherwise carry over to checkpoints and ONNX files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # not on Windows, where modes are not Unix permissions anyway
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file written line by line (metrics.jsonl, manifest.jsonl); a
    line cut short by a kill, or one that is not an object, is skipped; a missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
