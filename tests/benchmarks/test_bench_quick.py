"""benchmarks/bench_speed.py --quick runs end to end and reports every section (CI runs only this mode)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("## Machine", "## Peak", "## FLOPs", "## Inference", "## Training step", "## Loss curve",
            "## Frozen-backbone epoch", "## Upsampler share", "## Sliding window", "## Targets")


def test_quick_benchmark_reports_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_speed.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "# fcnseg speed benchmarks" in proc.stdout  # the report is printed too
    for section in SECTIONS:
        assert section in text, section
    assert "failed" not in text, text
    # Every measurement produced a row, and every target a verdict.
    for row in ("| baseline: chapter model", "| fp32-cl: + channels_last", "| bf16-cl: channels_last + bf16 autocast (the",
                "| bf16-cl-fold:", "| fp32: fcnseg train_step", "| fp32-cl-fused:", "| bf16-cl: channels_last + bf16 autocast (what", "| bf16-cl-fused:",
                "| cached: fcnseg, cached features", "| cached-fused-bf16:", "| fcnseg TransposedConvUpsampler (fp32",
                "| fcnseg TransposedConvUpsampler (bf16", "| `predict_sliding`"):
        assert row in text, row
    targets = text.split("## Targets", 1)[1]
    assert targets.count("**PASS**") + targets.count("**MISS**") == 6, targets
    # The loss curves of the chapter's step and fcnseg's agree from the same start: to float rounding
    # in fp32, to bf16's precision in bf16.
    match = re.search(r"Largest relative difference: fp32 ([0-9.e+-]+)\b.*, bf16 ([0-9.e+-]+) ", text)
    assert match and float(match.group(1)) < 1e-4 and float(match.group(2)) < 0.05, match
    # The inference rows ran on the fitted weights and scene images, not on noise.
    assert "after the short fit" in text


def test_rounds_merge_to_the_median_of_every_number():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from case_runner import median_merge  # benchmarks/case_runner.py

    rounds = [{"a": {"ips": 3.0, "batches": {"1": {"s": 1.0}}}, "note": "x", "flag": True},
              {"a": {"ips": 1.0, "batches": {"1": {"s": 5.0}}}, "note": "y", "flag": False},
              {"a": {"ips": 2.0, "batches": {"1": {"s": 2.0}}}, "note": "z", "flag": False}]
    assert median_merge(rounds) == {"a": {"ips": 2.0, "batches": {"1": {"s": 2.0}}}, "note": "x", "flag": True}
