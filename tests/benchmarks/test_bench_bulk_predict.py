"""benchmarks/bench_bulk_predict.py: the per-thread CPU count it reports, and a small run that prints
the ratio, each part's CPU per image and the bound they set."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require_shared

REPO = Path(__file__).resolve().parents[2]


def _measuring():
    """benchmarks/measuring.py, loaded by path (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_measuring", REPO / "benchmarks" / "measuring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_thread_cpu_counts_a_short_thread_that_ends_inside_the_block():
    with _measuring().ThreadCPU() as used:
        worker = threading.Thread(target=_burn, args=(0.05,), name="short")
        worker.start()
        worker.join()
    assert 0.05 <= used.by_name["short"] <= 0.2, used.by_name
    assert used.process >= 0.04
    assert threading.Thread.run.__name__ == "run"  # put back


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="live threads are read from Linux's /proc")
def test_thread_cpu_counts_a_thread_alive_across_the_block():
    go, done = threading.Event(), threading.Event()

    def loop() -> None:
        go.wait()
        _burn(0.3)
        done.set()
        time.sleep(0.5)

    worker = threading.Thread(target=loop, name="long", daemon=True)
    worker.start()
    with _measuring().ThreadCPU() as used:
        go.set()
        done.wait()
        time.sleep(0.05)  # idle: the main thread adds next to nothing
    assert 0.2 <= used.by_name["long"] <= 0.45, used.by_name
    assert used.by_name.get("MainThread", 0.0) < 0.1, used.by_name


def test_small_bulk_run_reports_cpu_per_part(tmp_path):
    camvid = require_shared("camvid")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_bulk_predict.py"), "--camvid", str(camvid),
                           "--images", "4", "--batch-size", "2", "--rounds", "1", "--workers", "0", "--threads", "1",
                           "--backend", "torch", "--overlay-format", "jpg"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"end to end, workers=0 +\(predict_files\): +[0-9.]+ images/s, ratio [0-9.]+", proc.stdout)
    match = re.search(r"reader thread ([0-9.]+), writer thread ([0-9.]+); bound .* = ([0-9.]+)", proc.stdout)
    assert match, proc.stdout
    reader, writer, bound = (float(g) for g in match.groups())
    assert reader > 0 and writer > 0 and 0 < bound < 1
