"""Speed of fcnseg against the d2l chapter's FCN, measured in one run on this machine.

    python benchmarks/bench_speed.py                  # full run (10-15 minutes), writes docs/BENCHMARKS.md
    python benchmarks/bench_speed.py --rounds 3       # each configuration 3 times, round-robin: medians
    python benchmarks/bench_speed.py --quick          # tiny sizes, under a minute: a smoke test
    python benchmarks/bench_speed.py --only infer,train --out /tmp/b.md

The baseline is the chapter's code path as written, built inline (chapter_baseline.py). Every
configuration runs in its own subprocess, this script run again with the hidden ``--case`` option
(case_runner.py), so that its peak resident memory is its own and process-wide settings do not leak
between them. Times are medians of several repeats after warm-up. The machine may be shared: the
report records the load average before and after the run.

The modules beside this script, one-way: bench_speed -> case_runner -> machine, inference_cases,
training_cases -> chapter_baseline, measuring -> configurations; bench_speed -> report -> targets ->
formatting, configurations.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# The sibling modules are imported by bare name (benchmarks/ is not a package): the script's folder
# is on sys.path when it runs, and this makes it so when the module is imported from elsewhere too.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from case_runner import CASES, measure, run_in_this_process  # noqa: E402
from configurations import FULL, QUICK, REPO  # noqa: E402
from machine import machine_info  # noqa: E402
from report import render  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (< 60 s): a smoke test")
    parser.add_argument("--out", help="markdown report (default docs/BENCHMARKS.md, or docs/BENCHMARKS-no-native-bf16.md on a CPU without native bf16; with --quick, none unless given)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores; 1 with --quick, which "
                        "measures nothing and should not depend on how busy the machine is)")
    parser.add_argument("--only", help="comma-separated cases: " + ",".join(CASES))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, round-robin, and report medians (default 1)")
    parser.add_argument("--bf16", choices=("auto", "always", "never"),
                        help="measure the bf16 configurations: auto (the default) where the CPU has native bf16 "
                        "(AVX-512 BF16 or AMX), always (also emulated, slowly: the default with --quick, which "
                        "runs every code path), never")
    # A case process: see case_runner.run_case.
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.case:  # inside a subprocess
        return run_in_this_process(args.case, args.configs.split(","), json.loads(args.params))

    params = dict(QUICK if args.quick else FULL)
    params["threads"] = args.threads or (1 if args.quick else os.cpu_count() or 1)
    if args.no_compile:
        params["compile"] = False
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(CASES):
        parser.error(f"unknown case(s) {', '.join(sorted(only - set(CASES)))}; choose from {', '.join(CASES)}")
    started = time.perf_counter()
    info = machine_info(params["threads"])
    bf16 = args.bf16 or ("always" if args.quick else "auto")
    params["bf16"] = bf16 == "always" or (bf16 == "auto" and bool(info["mkldnn_bf16"]))
    params["rounds"] = max(1, args.rounds)
    if params["bf16"]:
        info["softmax_kernel"] = build_softmax_kernel()
    # The targets were set for CPUs with native bf16; a run on another CPU gets a report of its own.
    default_out = REPO / "docs" / ("BENCHMARKS.md" if info["mkldnn_bf16"] else "BENCHMARKS-no-native-bf16.md")
    out = Path(args.out) if args.out else (None if args.quick else default_out)
    info["args"] = shown_arguments(argv if argv is not None else sys.argv[1:])
    results = measure(params, only, args.quick, started)
    info["load_after"] = os.getloadavg()
    info["total_s"] = time.perf_counter() - started
    text = render(results, info, params, quick=args.quick)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}")
    return 0


def build_softmax_kernel() -> str:
    """Builds the fused loss's bf16 softmax kernel here, once, so that no timed subprocess compiles it
    (torch caches the build); returns what the bf16 steps will run, for the report."""
    from fcnseg.ops.native import native_unavailable_reason, softmax_grad_kernel

    reason = native_unavailable_reason()
    built = reason is None and softmax_grad_kernel() is not None
    return ("compiled kernel (fcnseg.ops.native)" if built
            else f"eager torch operations ({reason or 'the kernel failed to build'})")


def shown_arguments(argv: list[str]) -> str:
    """The options as the report quotes them: without --out, since where the report goes is not how
    it was measured."""
    shown = list(argv)
    if "--out" in shown:
        del shown[shown.index("--out"):shown.index("--out") + 2]
    return "".join(f" {a}" for a in shown if not a.startswith("--out="))


if __name__ == "__main__":
    raise SystemExit(main())
