"""How every case measures: repeats after warm-up (alone or interleaved), medians, a case process's
set-up (threads, allocator) and its peak resident memory.

Kept apart from the cases so that all of them time and count alike.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable


def timed(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
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


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def setup_process(params: dict[str, Any], *, fast_allocator: bool) -> None:
    """Torch threads as the run asks, and fcnseg's allocator setting for fcnseg's configurations
    (the baselines keep glibc's default, as the chapter runs)."""
    import torch

    torch.set_num_threads(params["threads"])
    if fast_allocator:
        from fcnseg.runtime import keep_freed_memory

        keep_freed_memory()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (each configuration runs in its own process)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (otherwise bf16 is emulated, and slow)."""
    from fcnseg.runtime import native_cpu_bf16

    return native_cpu_bf16()
