"""Keeps freed CPU memory in the process, so large tensors stop paying for page faults.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and returns it to the kernel on ``free``. A training step at batch 8 and 320x480 allocates
and frees dozens of such blocks (the logits alone are 103 MB), so each one is faulted in page by
page and zeroed by the kernel again: on a 2-core AVX2 machine, filling a new 100 MB tensor took
90 ms instead of 6 ms, and the FCN head's step spent most of its time there.

`keep_freed_memory` switches glibc to serve large blocks from its heap and to keep freed memory
for reuse. It changes speed only, never results; the process's resident size stays at its peak
instead of shrinking between steps. It is a process-wide setting, so only entry points (the CLI,
benchmarks) call it, never library code.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

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


__all__ = ["keep_freed_memory"]
