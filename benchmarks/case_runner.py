"""Runs the benchmark's cases: one process per configuration, rounds run round-robin, medians over
rounds, results gathered per case for the report.

Every configuration runs in its own process so that its peak resident memory (``ru_maxrss``) is its
own and process-wide settings (threads, the allocator) do not leak between configurations. The
process is the user's script run again, ``python benchmarks/bench_speed.py --case NAME --configs A,B
--params JSON`` (hidden options), which calls `run_in_this_process` and prints one ``MARK`` line of
JSON that `run_case` reads back. With --quick every case shares one process (``--case batch``).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from configurations import (
    BF16_CONFIGS,
    EPOCH_CONFIGS,
    INFER_CONFIGS,
    MARK,
    NUM_CLASSES,
    REPO,
    SINGLE_PROCESS_CASES,
    TRAIN_CONFIGS,
    UPSAMPLER_CONFIGS,
)
from inference_cases import case_infer, case_sliding, case_upsampler
from machine import case_machine
from training_cases import case_curve, case_epoch, case_train

# The script a case process runs (beside this module): the user's entry point, so that a case
# process starts exactly as the parent did.
ENTRY = Path(__file__).resolve().with_name("bench_speed.py")

CASES: dict[str, Callable[[dict[str, Any], list[str]], dict[str, Any]]] = {
    "machine": case_machine, "infer": case_infer, "train": case_train, "curve": case_curve,
    "epoch": case_epoch, "upsampler": case_upsampler, "sliding": case_sliding,
}


def case_batch(params: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    """Several cases in one process (--quick: one interpreter start instead of seven)."""
    out: dict[str, Any] = {}
    for name, case_configs in params["runs"]:
        try:
            out[name] = CASES[name](params, case_configs)
        except Exception:  # reported like a failed subprocess
            out[name] = {"error": traceback.format_exc()}
    return out


def run_in_this_process(case: str, configs: list[str], params: dict[str, Any]) -> int:
    """The case process's work: measure, then print the result on one ``MARK`` line for `run_case`."""
    function = case_batch if case == "batch" else CASES[case]
    result = function(params, configs)
    print(MARK + json.dumps(result))
    return 0


def run_case(name: str, configs: list[str], params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs one case in a fresh interpreter and returns its result (or an error entry)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(params["threads"]), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, str(ENTRY), "--case", name, "--configs", ",".join(configs),
               "--params", json.dumps(params)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    elapsed = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
            result["_wall_s"] = elapsed
            return result
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"error": f"exit {proc.returncode}: {tail}"}


def median_merge(results: list[Any]) -> Any:
    """Several rounds' results of one case merged: numbers by their median, the rest from round one."""
    first = results[0]
    if isinstance(first, dict):
        return {key: median_merge([r[key] for r in results if isinstance(r, dict) and key in r]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(results)
    return first


def plan(params: dict[str, Any], only: set[str] | None, quick: bool) -> list[tuple[str, list[str]]]:
    """(case, configs) per subprocess: one configuration each in a full run, one process per case in --quick."""
    infer = [c for c in INFER_CONFIGS if params["compile"] or "compile" not in c]
    train = [c for c in TRAIN_CONFIGS if params["compile"] or c != "compile"]
    cases = [("machine", ["all"]), ("curve", ["all"]), ("infer", infer), ("train", train),
             ("epoch", list(EPOCH_CONFIGS)), ("upsampler", list(UPSAMPLER_CONFIGS)), ("sliding", ["all"])]
    runs = []
    for name, configs in cases:
        if only and name not in only:
            continue
        if not params["bf16"]:
            configs = [c for c in configs if c not in BF16_CONFIGS.get(name, ())]
        if quick or name in SINGLE_PROCESS_CASES:
            runs.append((name, configs))
        else:
            runs.extend((name, [c]) for c in configs)
    return runs


def make_epoch_dataset(workdir: Path, params: dict[str, Any]) -> Path:
    """A folder dataset of procedural scenes, VOC-like in size, for the epoch measurements."""
    sys.path.insert(0, str(REPO / "src"))
    from fcnseg.data.synthetic import make_synthetic

    # train.txt receives 4 of every 5 scenes.
    n = math.ceil(params["epoch_images"] * 5 / 4)
    return make_synthetic(workdir / "scenes", num_classes=NUM_CLASSES, n=n, size=tuple(params["image_size"]), seed=0,
                          progress=False)


Outcome = tuple[str, list[str], dict[str, Any]]  # (case, configurations, result or error entry)


def run_quick(runs: list[tuple[str, list[str]]], params: dict[str, Any]) -> list[Outcome]:
    """--quick: every case in one process."""
    print(f"one process: {', '.join(name for name, _ in runs)}", flush=True)
    batch = run_case("batch", ["-"], dict(params, runs=runs), timeout=120)
    return [(name, configs, batch.get(name, batch)) for name, configs in runs]


def run_rounds(runs: list[tuple[str, list[str]]], params: dict[str, Any], started: float) -> list[Outcome]:
    """A full run: every process of the plan ``params["rounds"]`` times, medians over the rounds."""
    # With --rounds N every timed configuration runs N times, round-robin, each in its own
    # process, and the report takes the median over rounds: configurations compared in a
    # ratio then share the machine's slow and fast spells (measured here: +-30% over minutes).
    # The peak is measured every round too: one measurement in a slow spell would misstate
    # every "% of peak" in the report.
    schedule = runs * params["rounds"]
    rounds: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for name, configs in schedule:
        print(f"[{time.perf_counter() - started:6.1f} s] {name}: {', '.join(configs)}", flush=True)
        rounds.setdefault((name, tuple(configs)), []).append(run_case(name, configs, params, timeout=600))
    outcomes = []
    for (name, configs), measured in rounds.items():
        good = [m for m in measured if "error" not in m]
        outcomes.append((name, list(configs), median_merge(good) if good else measured[0]))
    return outcomes


def gather(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Results per case as the report reads them; a failed process leaves an ``_error_`` entry."""
    results: dict[str, dict[str, Any]] = {}
    for name, configs, result in outcomes:
        if "error" in result:
            print(f"    {name} failed: {result['error']}", flush=True)
            results.setdefault(name, {})["_error_" + "+".join(configs)] = result["error"]
            continue
        result.pop("_wall_s", None)
        if name in SINGLE_PROCESS_CASES:
            results[name] = result
        else:
            results.setdefault(name, {}).update(result)
    return results


def measure(params: dict[str, Any], only: set[str] | None, quick: bool, started: float) -> dict[str, dict[str, Any]]:
    """Every case of the plan, in a work folder (scenes, fitted weights) removed afterwards.

    ``params`` receives the work folder and the scenes' location, which the case processes read.
    """
    with tempfile.TemporaryDirectory(prefix="fcnseg-bench-") as workdir:
        params["workdir"] = workdir
        runs = plan(params, only, quick)
        if any(name in ("epoch", "curve") for name, _ in runs):
            params["dataset_root"] = str(make_epoch_dataset(Path(workdir), params))
        outcomes = run_quick(runs, params) if quick else run_rounds(runs, params, started)
        return gather(outcomes)
