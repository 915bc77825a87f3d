"""Bulk prediction end to end against the model alone: how much of the model's speed `fcnseg predict` keeps.

    python benchmarks/bench_bulk_predict.py                        # 200 CamVid images, the real run, alone
    python benchmarks/bench_bulk_predict.py --images 8 --rounds 1  # a smoke test
    python benchmarks/bench_bulk_predict.py --checkpoint runs/camvid/best.pt --amp bf16 --workers 1 --json r.json

Two measurements of one configuration (model, batch size, precision, engine), in one process and
interleaved round by round, so that a slow spell of a shared machine lands on both alike:

- model only: `Segmenter.logits` and the class map (`fcnseg.ops.class_map`) on the images already decoded and normalised, in
  batches of ``--batch-size`` (the CamVid images all share one size): the ceiling;
- end to end: `fcnseg.inference.bulk.predict_files` (what ``fcnseg predict`` runs) over the same
  image files: decoding in ``--workers`` DataLoader processes, batching, the forward passes, the
  label-map and overlay PNGs written atomically, manifest.jsonl; a fresh output folder each round,
  once per worker count of ``--workers`` (0, 1 and 2 by default: on 2 cores a worker's decoding
  competes with the model's threads, so the best count is measured, not assumed).

It prints images per second of each and the ratio of end to end to the model alone (target >= 0.85),
then the CPU per image of each side (this process, and the end-to-end run's reader and writer threads)
and the bound they set: with every core busy the ratio reaches at most the model's share of the work.
Without ``--checkpoint`` the model is the recommended CamVid model's architecture (MobileNetV2
FCN-8s) with the ImageNet body of ../shared/data/weights and an untrained head: speed does not
depend on the head's weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measuring import ThreadCPU

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TARGET = 0.85


def build_parser() -> argparse.ArgumentParser:
    from fcnseg.constants import DEFAULT_BACKEND, OVERLAY_FORMATS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint or model folder (default: MobileNetV2 FCN-8s, ImageNet body)")
    parser.add_argument("--camvid", default=str(SHARED / "camvid"), help="the CamVid folder (SegNet layout)")
    parser.add_argument("--images", type=int, default=200, help="CamVid images (val first, then train)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--amp", default="auto", help="auto, bf16, fp16 or none (as fcnseg predict --amp)")
    parser.add_argument("--backend", default=DEFAULT_BACKEND,
                        help="the Segmenter's engine (as fcnseg predict --backend; default: auto)")
    parser.add_argument("--compile", action="store_true", help="compile the model (as fcnseg predict --compile)")
    parser.add_argument("--workers", default="0,1,2",
                        help="DataLoader workers decoding images end to end; a comma-separated list measures each")
    parser.add_argument("--no-overlay", dest="overlay", action="store_false",
                        help="label maps only, as fcnseg predict --no-overlay")
    parser.add_argument("--overlay-format", default="png", choices=OVERLAY_FORMATS,
                        help="the overlays' format, as fcnseg predict --overlay-format")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both measurements; medians")
    parser.add_argument("--json", help="also write the results here")
    return parser


def camvid_images(root: Path, count: int) -> list[Path]:
    """The first ``count`` CamVid images, val then train (their names are distinct)."""
    images = sorted((root / "val").glob("*.png")) + sorted((root / "train").glob("*.png"))
    if len(images) < count:
        raise SystemExit(f"{root} holds {len(images)} images, fewer than --images {count}")
    return images[:count]


def build_segmenter(args: argparse.Namespace, workdir: Path) -> Any:
    """The Segmenter of the configuration: the given checkpoint, or MobileNetV2 FCN-8s with CamVid's classes."""
    import torch

    from fcnseg import fcn_mobilenet_v2
    from fcnseg.data.registry import build_dataset
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else workdir / "model.pt"
    if not args.checkpoint:
        val = build_dataset("camvid", args.camvid, "val")
        torch.manual_seed(0)
        model = fcn_mobilenet_v2(variant="8s", num_classes=len(val.classes),
                                 weights_backbone=str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"))
        save_checkpoint(make_checkpoint(model, classes=list(val.classes), colors=[list(c) for c in val.colors]),
                        checkpoint)
    return Segmenter.from_checkpoint(checkpoint, device="cpu", amp=args.amp, batch_size=args.batch_size,
                                     backend=args.backend, compile=args.compile)


def model_only(segmenter: Any, batches: list[Any]) -> float:
    """Seconds of the forward passes and class maps over pre-decoded, normalised batches."""
    from fcnseg.ops.argmax import class_map

    start = time.perf_counter()
    for batch in batches:
        class_map(segmenter.logits(batch)).cpu()
    return time.perf_counter() - start


def end_to_end(segmenter: Any, images: list[Path], out: Path, workers: int, overlay: bool = True,
               overlay_format: str = "png") -> float:
    """Seconds of a bulk prediction of the image files into a fresh folder."""
    from fcnseg.inference.bulk import predict_files

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = predict_files(segmenter, images, out, workers=workers, overlay=overlay, overlay_format=overlay_format)
    seconds = time.perf_counter() - start
    if result.failures or result.ok != len(images):
        raise SystemExit(f"bulk prediction failed: {result.failures[:3]}")
    return seconds


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    from fcnseg.data.io import image_to_tensor

    torch.set_num_threads(args.threads)
    images = camvid_images(Path(args.camvid), args.images)
    segmenter = build_segmenter(args, workdir)
    tensors = [segmenter.preprocess(image_to_tensor(p)) for p in images]
    batches = [torch.stack(tensors[i : i + args.batch_size]) for i in range(0, len(tensors), args.batch_size)]
    started = time.perf_counter()
    model_only(segmenter, batches[:1])  # warm-up (compilation, with --compile)
    warmup = time.perf_counter() - started
    workers = [int(w) for w in str(args.workers).split(",")]
    times: dict[str, list[float]] = {"model": [], **{f"workers={w}": [] for w in workers}}
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in times}
    for _ in range(args.rounds):
        with ThreadCPU() as used:
            times["model"].append(model_only(segmenter, batches))
        cpu["model"].append(cpu_per_image(used, len(images)))
        for w in workers:
            with ThreadCPU() as used:
                seconds = end_to_end(segmenter, images, workdir / "out", w, args.overlay, args.overlay_format)
            times[f"workers={w}"].append(seconds)
            cpu[f"workers={w}"].append(cpu_per_image(used, len(images)))
    rates = {name: len(images) / statistics.median(values) for name, values in times.items()}
    ratios = {name: rate / rates["model"] for name, rate in rates.items() if name != "model"}
    cpu_ms = {name: {part: statistics.median(r[part] for r in rounds) for part in rounds[0]}
              for name, rounds in cpu.items()}
    return {"images": len(images), "size": list(tensors[0].shape[-2:]), "batch_size": args.batch_size,
            "amp": args.amp, "dtype": str(segmenter.dtype), "backend": args.backend, "compile": args.compile,
            "overlay": args.overlay, "overlay_format": args.overlay_format,
            "workers": workers, "threads": args.threads, "rounds": args.rounds, "warmup_s": warmup,
            "seconds": times, "images_per_s": rates, "ratios": ratios, "best_ratio": max(ratios.values()),
            "cpu_ms_per_image": cpu_ms}


def cpu_per_image(used: ThreadCPU, images: int) -> dict[str, float]:
    """Milliseconds of CPU per image: the process's, and the bulk run's reader and writer threads'."""
    return {"process": used.process / images * 1e3,
            "reader": used.by_name.get("fcnseg-reader", 0.0) / images * 1e3,
            "writer": used.by_name.get("fcnseg-writer", 0.0) / images * 1e3}


def render(result: dict[str, Any]) -> str:
    rates = result["images_per_s"]
    outputs = f"{result.get('overlay_format', 'png').upper()} overlays" if result.get("overlay", True) else "label maps only"
    lines = [
        f"{result['images']} CamVid images {result['size'][0]}x{result['size'][1]}, batch {result['batch_size']}, "
        f"amp {result['amp']} ({result['dtype']}), backend {result['backend']}{', compiled' if result['compile'] else ''}, "
        f"{result['threads']} threads, {outputs}; "
        f"medians of {result['rounds']} rounds",
        f"  model only (pre-decoded tensors):      {rates['model']:7.2f} images/s",
    ]
    cpu = result["cpu_ms_per_image"]
    for name, ratio in result["ratios"].items():
        verdict = "meets" if ratio >= TARGET else "misses"
        lines.append(f"  end to end, {name:<10} (predict_files): {rates[name]:7.2f} images/s, ratio {ratio:.3f} "
                     f"({verdict} the target {TARGET})")
    lines.append(f"CPU per image (ms, medians): model only {cpu['model']['process']:.1f}")
    for name in result["ratios"]:
        used = cpu[name]
        line = (f"  end to end, {name}: {used['process']:.1f} in this process, of which reader thread "
                f"{used['reader']:.1f}, writer thread {used['writer']:.1f}")
        if name == "workers=0" and used["reader"] > 0:
            # With every core busy, the ratio can reach at most the model's share of the CPU work.
            beside = used["reader"] + used["writer"]
            line += f"; bound model / (model + reader + writer) = {cpu['model']['process'] / (cpu['model']['process'] + beside):.3f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fcnseg.runtime import keep_freed_memory

    keep_freed_memory()  # speed only, as fcnseg train does
    with tempfile.TemporaryDirectory(prefix="bench_bulk_") as workdir:
        result = measure(args, Path(workdir))
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
