"""How every case measures: repeats after warm-up (alone or interleaved), medians, a case process's
set-up (threads, allocator) and its peak resident memory.

Kept apart from the cases so that all of them time and count alike.
"""
from __future__ import annotations

import os
import resource
import statistics
import threading
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


class ThreadCPU:
    """CPU seconds over a ``with`` block: the whole process's, and each Python thread's, summed by
    thread name (``by_name``).

    A thread alive at the block's end is read from /proc (Linux; elsewhere it is not counted). A
    thread that starts and ends inside the block (a bulk run's reader and writer) reports its own
    ``time.thread_time()`` as it ends: ``threading.Thread.run`` is wrapped for the block's length.
    """

    def __init__(self) -> None:
        self.process = 0.0
        self.by_name: dict[str, float] = {}
        self._ended: list[tuple[str, float]] = []
        self._start: dict[int, float] = {}
        self._run = threading.Thread.run

    def __enter__(self) -> "ThreadCPU":
        self._start = {tid: seconds for tid, (_, seconds) in _alive_threads().items()}
        self._process_start = _process_cpu()
        ended, run = self._ended, self._run

        def counted_run(thread: threading.Thread) -> None:
            try:
                run(thread)
            finally:
                ended.append((thread.name, time.thread_time()))

        threading.Thread.run = counted_run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        threading.Thread.run = self._run  # type: ignore[method-assign]
        self.process = _process_cpu() - self._process_start
        for tid, (name, seconds) in _alive_threads().items():
            self._add(name, seconds - self._start.get(tid, 0.0))
        for name, seconds in self._ended:
            self._add(name, seconds)

    def _add(self, name: str, seconds: float) -> None:
        self.by_name[name] = self.by_name.get(name, 0.0) + seconds


def _alive_threads() -> dict[int, tuple[str, float]]:
    """(name, CPU seconds so far) of each live Python thread, from /proc/self/task (Linux only)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    found = {}
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:  # not Linux, or the thread has just ended
            continue
        found[thread.native_id] = (thread.name, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
