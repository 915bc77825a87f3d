"""Inference engines side by side: the same model and images in torch, onnxruntime and OpenVINO.

    python benchmarks/bench_engines.py --checkpoint runs/camvid/best.pt   # the real run, alone on the machine
    python benchmarks/bench_engines.py --quick                            # a smoke test: 2 images, 2 repeats
    python benchmarks/bench_engines.py --only torch-fp32,ov-bf16 --rounds 3 --json /tmp/engines.json

What it measures, per configuration (torch fp32 / bf16 / compiled, onnxruntime fp32 / INT8,
OpenVINO f32 / bf16 / INT8, and "default": what `Segmenter` runs when given neither engine nor
precision): images per second of `Segmenter.logits` on one CamVid val image (360x480, batch 1,
whole mode: the engine's forward pass as the Segmenter calls it, autocast included; the class map
after it, `fcnseg.ops.class_map`, costs every engine alike), its ratio to torch fp32 measured in
the same run, the first call's seconds (export, compilation), and on ``--images`` CamVid val images the share of pixels with the same class as
torch fp32 and the mIoU against the ground truth. INT8 is the file ``fcnseg export --int8`` writes
(QDQ, calibrated on ``--calibration-images`` CamVid train images), run by onnxruntime and by
OpenVINO; torch-int8 is PyTorch's own (PT2E, `fcnseg.inference.pt2e_engine`) calibrated on the same images. Without ``--checkpoint`` the model is the recommended CamVid model's architecture
(MobileNetV2 FCN-8s) with the ImageNet body of ../shared/data/weights and a zero-initialised head,
so it predicts one class and agreement/mIoU say nothing: give a trained checkpoint for those.

Every configuration runs in its own process (this script again, with ``--case``), so that one
engine's thread pool (torch's spinning OpenMP threads, OpenVINO's TBB, onnxruntime's pool) never
runs beside another's; with ``--rounds R`` the configurations run round-robin R times and each
figure is the median, so a slow spell of a shared machine lands on all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# name -> (engine, amp, compile, int8 file)
CONFIGS: dict[str, tuple[str, str, bool, bool]] = {
    "torch-fp32": ("torch", "none", False, False),
    "torch-bf16": ("torch", "bf16", False, False),
    "torch-compile": ("torch", "none", True, False),
    "torch-bf16-compile": ("torch", "bf16", True, False),
    "ort-fp32": ("onnxruntime", "none", False, False),
    "ort-int8": ("onnxruntime", "none", False, True),
    "torch-int8": ("torch-int8", "none", False, False),  # PT2E, calibrated on the same train images
    "ov-f32": ("openvino", "none", False, False),
    "ov-bf16": ("openvino", "bf16", False, False),
    "ov-int8": ("openvino", "none", False, True),
    "default": ("auto", "auto", False, False),  # Segmenter() with no engine or precision given
}
BASELINE = "torch-fp32"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a CamVid-trained checkpoint (default: ImageNet body, untrained head)")
    parser.add_argument("--camvid", default=str(SHARED / "camvid"), help="the CamVid folder (SegNet layout)")
    parser.add_argument("--only", help="comma-separated configurations (default: all of " + ", ".join(CONFIGS) + ")")
    parser.add_argument("--images", type=int, default=101, help="val images for agreement and mIoU")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per configuration and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=1, help="round-robin runs of every configuration")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every engine")
    parser.add_argument("--calibration-images", type=int, default=64, help="CamVid train images calibrating INT8")
    parser.add_argument("--quick", action="store_true", help="2 images, 2 repeats, 1 warm-up, 8 calibration images")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--workdir", help="keep the model, INT8 file and predictions here (default: a temp folder)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.warmup, args.calibration_images = 2, 2, 1, 8
    if args.case:
        print(json.dumps(run_case(args)))
        return 0
    configs = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if BASELINE not in configs:
        configs.insert(0, BASELINE)  # every ratio is against torch fp32 measured in this run
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as temp:
        workdir = Path(args.workdir or temp)
        workdir.mkdir(parents=True, exist_ok=True)
        prepare(args, workdir, configs)
        runs = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name in configs:
                runs[name].append(_run_case_process(args, workdir, name))
        results = summarise(args, workdir, runs)
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def prepare(args: argparse.Namespace, workdir: Path, configs: list[str]) -> None:
    """The checkpoint every case loads, the val image list and, when asked for, the INT8 file."""
    import torch

    from fcnseg import fcn_mobilenet_v2
    from fcnseg.data.registry import build_dataset
    from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

    val = build_dataset("camvid", args.camvid, "val")
    step = max(len(val) // max(args.images, 1), 1)
    chosen = list(range(0, len(val), step))[: args.images]
    (workdir / "images.json").write_text(json.dumps([str(val.image_paths[i]) for i in chosen]))
    (workdir / "masks.json").write_text(json.dumps([str(val.mask_paths[i]) for i in chosen]))
    checkpoint = workdir / "model.pt"
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    elif not checkpoint.exists():
        torch.manual_seed(0)
        model = fcn_mobilenet_v2(variant="8s", num_classes=len(val.classes),
                                 weights_backbone=str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"))
        save_checkpoint(make_checkpoint(model, classes=list(val.classes), colors=[list(c) for c in val.colors]),
                        checkpoint)
    (workdir / "checkpoint.txt").write_text(str(checkpoint))
    if any(CONFIGS[c][3] for c in configs) and not (workdir / "int8.onnx").exists():
        from fcnseg.export.int8 import export_int8

        started = time.perf_counter()
        report = export_int8(checkpoint, workdir / "int8.onnx", Path(args.camvid) / "train",
                             calibration_images=args.calibration_images, exporter="legacy")
        report["export_s"] = time.perf_counter() - started
        (workdir / "int8.json").write_text(json.dumps({k: v for k, v in report.items() if k != "fp32"}))


def _run_case_process(args: argparse.Namespace, workdir: Path, name: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--case", name, "--workdir", str(workdir), "--camvid", args.camvid,
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{name}: failed: {tail}", file=sys.stderr)
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process: build, time ``Segmenter.logits``, predict the val images."""
    import warnings

    import numpy as np
    import torch

    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.runtime import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    warnings.simplefilter("ignore")
    workdir = Path(args.workdir)
    engine, amp, compile_, int8 = CONFIGS[args.case]
    started = time.perf_counter()
    if int8:
        from fcnseg.inference.onnx_engine import onnx_segmenter

        segmenter = onnx_segmenter(workdir / "int8.onnx", backend=engine, amp=amp)
    else:
        checkpoint = (workdir / "checkpoint.txt").read_text()
        calibration = []
        if engine == "torch-int8":
            from fcnseg.export.int8 import calibration_files

            calibration = calibration_files(Path(args.camvid) / "train", args.calibration_images)
        segmenter = Segmenter.from_checkpoint(checkpoint, "cpu", backend=engine, amp=amp, compile=compile_,
                                              calibration=calibration)
    build_s = time.perf_counter() - started
    images = json.loads((workdir / "images.json").read_text())
    x = segmenter.preprocess(images[0])[None]
    started = time.perf_counter()
    segmenter.logits(x)
    first_s = time.perf_counter() - started
    for _ in range(args.warmup):
        segmenter.logits(x)
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        segmenter.logits(x)
        times.append(time.perf_counter() - started)
    preds = np.stack([p.astype(np.uint8) for p in segmenter.predict(images)])
    np.save(workdir / f"pred-{args.case}.npy", preds)
    return {"median_s": statistics.median(times), "build_s": build_s, "first_call_s": first_s}


def summarise(args: argparse.Namespace, workdir: Path, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds, ratios to torch fp32, agreement with it and mIoU against the masks."""
    import numpy as np
    import torch

    from fcnseg.data.camvid import CAMVID_CLASSES, CAMVID_VOID_ID
    from fcnseg.data.io import read_mask
    from fcnseg.metrics import ConfusionMatrix

    classes = len(CAMVID_CLASSES)
    masks = [read_mask(p, num_classes=classes, void_id=CAMVID_VOID_ID)
             for p in json.loads((workdir / "masks.json").read_text())]
    reference = np.load(workdir / f"pred-{BASELINE}.npy") if (workdir / f"pred-{BASELINE}.npy").exists() else None
    base = _median_of(runs.get(BASELINE, []), "median_s")
    rows = {}
    for name, results in runs.items():
        median_s = _median_of(results, "median_s")
        row: dict[str, Any] = {"images_per_s": 1 / median_s if median_s else None,
                               "ratio": base / median_s if median_s and base else None,
                               "first_call_s": _median_of(results, "first_call_s"),
                               "errors": [r["error"] for r in results if "error" in r]}
        path = workdir / f"pred-{name}.npy"
        if path.exists():
            preds = np.load(path)
            row["agreement"] = float((preds == reference).mean()) if reference is not None else None
            matrix = ConfusionMatrix(classes)
            for pred, mask in zip(preds, masks):
                matrix.update(torch.from_numpy(pred.astype(np.int64)), mask)
            row["miou"] = matrix.compute().miou
        rows[name] = row
    int8 = json.loads((workdir / "int8.json").read_text()) if (workdir / "int8.json").exists() else None
    return {"machine": _machine(args.threads), "checkpoint": (workdir / "checkpoint.txt").read_text(),
            "images": len(masks), "repeats": args.repeats, "rounds": args.rounds, "int8_export": int8,
            "configs": rows}


def _median_of(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def _machine(threads: int) -> dict[str, Any]:
    import platform

    import torch

    from fcnseg.runtime import native_cpu_bf16

    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {"torch": torch.__version__}
    for package in ("onnxruntime", "openvino"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "native_bf16": native_cpu_bf16(),
            "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"), **versions}


def render(results: dict[str, Any]) -> str:
    """The results as a Markdown table (the form docs/BENCHMARKS.md takes)."""
    m = results["machine"]
    lines = [f"{m['cpu']}, {m['threads']} threads, native bf16: {m['native_bf16']}; torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}, openvino {m['openvino']}; load {m['load'][0]:.2f}; {m['date']}",
             f"checkpoint {results['checkpoint']}; {results['images']} CamVid val images; 360x480, batch 1; "
             f"{results['repeats']} repeats x {results['rounds']} rounds", "",
             "| configuration | img/s | vs torch fp32 | first call s | same class as torch fp32 | mIoU |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for name, row in results["configs"].items():
        if row["errors"] and row["images_per_s"] is None:
            lines.append(f"| {name} | failed: {row['errors'][0]} | | | | |")
            continue
        lines.append(f"| {name} | {fmt(row['images_per_s'], '.2f')} | {fmt(row['ratio'], '.2f')}x | "
                     f"{fmt(row['first_call_s'], '.1f')} | {fmt(row.get('agreement'), '.2%')} | "
                     f"{fmt(row.get('miou'), '.4f')} |")
    lines += ["", "fastest per precision (what AUTO_ORDER in fcnseg/inference/backends.py should say): "
              + "; ".join(f"{precision}: {name} ({rate:.2f} img/s)" for precision, (name, rate) in fastest(results).items())]
    rates = {name: row["images_per_s"] for name, row in results["configs"].items() if row["images_per_s"]}
    precision = "bf16" if m["native_bf16"] else "fp32"  # what amp "auto" resolves to on this CPU
    if "default" in rates and precision in fastest(results):
        best, rate = fastest(results)[precision]
        lines.append(f"default / fastest {precision} ({best}): {rates['default'] / rate:.2f}x")
    if {"ort-fp32", "ort-int8"} <= rates.keys():  # issue 19's INT8 target: >= 1.5x the float32 model in onnxruntime
        lines.append(f"ort-int8 / ort-fp32: {rates['ort-int8'] / rates['ort-fp32']:.2f}x")
    return "\n".join(lines)


def fastest(results: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """Per precision (fp32, bf16, int8), the configuration with the most images per second."""
    best: dict[str, tuple[str, float]] = {}
    for name, row in results["configs"].items():
        if name == "default":  # not a configuration of its own: it is one of the others
            continue
        int8 = CONFIGS[name][3] or CONFIGS[name][0] == "torch-int8"
        precision = "int8" if int8 else ("bf16" if CONFIGS[name][1] == "bf16" else "fp32")
        rate = row["images_per_s"]
        if rate is not None and rate > best.get(precision, ("", 0.0))[1]:
            best[precision] = (name, rate)
    return best


if __name__ == "__main__":
    sys.exit(main())
