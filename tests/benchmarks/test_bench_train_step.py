"""benchmarks/bench_train_step.py runs on a tiny dataset and prints every comparison with its ratio."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_step_benchmark_prints_each_ratio(tmp_path):
    from fcnseg.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "data", num_classes=3, n=6, size=(64, 80), seed=0)
    options = ["--dataset", "folder", "--root", str(root), "--model", "fcn_mobilenet_v2", "--variant", "4s",
               "--weights-backbone", "none", "--crop", "64x64", "--batch-size", "2", "--workers", "0",
               "--loss", "ce+dice", "--cache-images", "--no-progress"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--steps", "1",
                           "--rounds", "1", "--", *options],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fcn_mobilenet_v2 FCN-4s, loss ce+dice, batch (2, 3, 64, 64)" in proc.stdout
    for name, fast, slow in (("depthwise", "spread", "torch"), ("loss", "fused", "unfused"),
                             ("data", "in memory", "from files")):
        line = re.search(rf"^{name}: {fast} ([0-9.]+) s, {slow} ([0-9.]+) s, ratio ([0-9.]+)$", proc.stdout, re.M)
        assert line and float(line.group(1)) > 0 and float(line.group(2)) > 0, (name, proc.stdout)
