"""`fcnseg export`: a checkpoint as an ONNX model, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fcnseg.cli import options
from fcnseg.constants import INT8_AGREEMENT_WARNING
from fcnseg.errors import OptionError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fcnseg.export import DEFAULT_OPSET, DEFAULT_SIZES, DEFAULT_TOLERANCE, EXPORTERS

    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX and check it against PyTorch",
        formatter_class=options.DefaultsHelpFormatter,
        description="Writes an ONNX model (input 'image' (N, 3, H, W) normalised, output 'logits' (N, C, H, W), "
                    "N, H and W dynamic) with the class names, colours, mean and std in its metadata, after "
                    "checking that onnxruntime matches PyTorch on random inputs of each --sizes.")
    p.add_argument("checkpoint", help="a checkpoint written by fcnseg train, or a model folder")
    p.add_argument("--format", choices=("onnx", "hf"), default="onnx",
                   help="onnx: an ONNX model; hf: a model folder in the Hugging Face convention (--out DIR gets "
                        "model.safetensors, config.json and a README.md model card)")
    p.add_argument("--license", default="unknown", metavar="ID",
                   help="with --format hf: the model card's licence id (mit, apache-2.0, cc-by-4.0, other...)")
    p.add_argument("--out", help="the .onnx file (default: the checkpoint's path with .onnx)")
    p.add_argument("--opset", type=options.positive_int, default=DEFAULT_OPSET, help="ONNX opset (dynamo needs 18+)")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="dynamo: torch's maintained exporter; legacy: the deprecated TorchScript one, "
                        "about 20 times faster, same results")
    sizes = " ".join(f"{h}x{w}" for h, w in DEFAULT_SIZES)
    p.add_argument("--sizes", nargs="+", type=options.size, default=list(DEFAULT_SIZES), metavar="HxW",
                   help=f"input sizes on which onnxruntime must match PyTorch (default: {sizes})")
    p.add_argument("--tolerance", type=options.positive_float, default=DEFAULT_TOLERANCE,
                   help="largest allowed absolute logit difference")
    options.add_flag(p, "--static", default=False,
                     help="fix the input to 1x3x(first size) instead of dynamic N, H, W")
    options.add_flag(p, "--verify", default=True, help="check parity with PyTorch in onnxruntime")
    options.add_flag(p, "--int8", default=False,
                     help="write an INT8 model statically quantised with onnxruntime (needs --calibration); "
                          "run it with fcnseg.inference.onnx_engine.onnx_segmenter (docs/ENGINES.md)")
    p.add_argument("--calibration", metavar="DIR",
                   help="with --int8: a folder of images like those the model will segment")
    p.add_argument("--calibration-images", type=options.positive_int, default=64, metavar="N",
                   help="with --int8: how many of the folder's images calibrate (spread over the folder)")
    options.add_flag(p, "--reduce-range",
                     help="with --int8: 7-bit weights, which x86 CPUs without VNNI need (their int8 kernels "
                          "overflow on 8-bit weights); --no-reduce-range: 8-bit, for CPUs with VNNI or ARM "
                          "(default: what this machine needs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.export.onnx import export_onnx
    from fcnseg.models.checkpoint import check_checkpoint_path

    checkpoint = check_checkpoint_path(args.checkpoint)
    if args.format == "hf" and not args.int8:
        return _run_model_folder(args, checkpoint)
    if args.exporter == "dynamo" and args.opset < 18:
        raise OptionError(f"--opset {args.opset}: the dynamo exporter writes opset 18 or later; "
                          "give --opset 18 or more, or --exporter legacy")
    if args.int8:
        return _run_int8(args, checkpoint)
    if args.calibration is not None or args.reduce_range is not None:
        given = "--calibration" if args.calibration is not None else "--reduce-range"
        raise OptionError(f"{given} applies to an INT8 export: add --int8")
    out = options.check_output_file(Path(args.out) if args.out else checkpoint.with_suffix(".onnx"))
    print(f"exporting {checkpoint} with the {args.exporter} exporter (opset {args.opset})...", flush=True)
    report = export_onnx(checkpoint, out, opset=args.opset, dynamic=not args.static, verify=args.verify,
                         sizes=args.sizes, exporter=args.exporter, tolerance=args.tolerance)
    print(format_report(report))
    return 0


def _run_int8(args: argparse.Namespace, checkpoint: Path) -> int:
    """``--int8``: the float32 export, checked, then statically quantised on the calibration images."""
    from fcnseg.export.int8 import calibration_files, export_int8

    if args.format != "onnx":
        raise OptionError(f"--int8 writes ONNX; it does not apply to --format {args.format}")
    if args.calibration is None:
        raise OptionError("--int8 needs --calibration DIR: a folder of images like those you will segment")
    calibration_files(args.calibration, args.calibration_images)  # a usage error before the export's work
    default = checkpoint.with_name(checkpoint.stem + "_int8.onnx")
    out = options.check_output_file(Path(args.out) if args.out else default)
    print(f"exporting {checkpoint} to INT8, calibrated on up to {args.calibration_images} images of "
          f"{args.calibration}...", flush=True)
    report = export_int8(checkpoint, out, args.calibration, calibration_images=args.calibration_images,
                         exporter=args.exporter, opset=args.opset, verify=args.verify, sizes=args.sizes,
                         tolerance=args.tolerance, dynamic=not args.static, reduce_range=args.reduce_range)
    print(format_report(report["fp32"]).replace(f"wrote {report['fp32']['path']}", "float32 model", 1))
    unreadable = f" ({report['unreadable']} unreadable skipped)" if report["unreadable"] else ""
    bits = "7-bit" if report["reduce_range"] else "8-bit"
    print(f"wrote {report['path']}: INT8 (QDQ, per-channel {bits} weights), calibrated on "
          f"{report['calibration_images']} images{unreadable}; {report['int8_bytes'] / 1e6:.1f} MB "
          f"(float32 {report['fp32_bytes'] / 1e6:.1f} MB); "
          f"same class as float32 on {100 * report['agreement']:.2f}% of the calibration pixels")
    if report["agreement"] < INT8_AGREEMENT_WARNING:
        print(f"warning: below {100 * INT8_AGREEMENT_WARNING:.0f}%: compare both files with fcnseg eval before "
              "shipping the INT8 one (docs/ENGINES.md, \"INT8 ONNX export\")", file=sys.stderr)
    return 0


def _run_model_folder(args: argparse.Namespace, checkpoint: Path) -> int:
    """``--format hf``: model.safetensors, config.json and README.md in the folder --out."""
    from fcnseg.export.model_folder import export_model_folder

    if args.calibration is not None:
        raise OptionError("--calibration calibrates an INT8 ONNX export; it does not apply to --format hf")
    out = options.check_output_folder(Path(args.out) if args.out else checkpoint.with_suffix(""))
    if out.resolve() == checkpoint.resolve():
        raise OptionError(f"--out {out} is the model folder being exported; give another folder")
    report = export_model_folder(checkpoint, out, license=args.license)
    print(f"wrote {report['path']}: {', '.join(report['files'])} ({report['num_classes']} classes, "
          f"{report['parameters'] / 1e6:.2f} M parameters); load it with Segmenter.from_pretrained"
          f"(\"{report['path']}\") or pass the folder to any fcnseg command that takes a checkpoint")
    return 0


def format_report(report: dict) -> str:
    """The export report as a few lines of text."""
    axes = "dynamic batch, height and width" if report["dynamic"] else "static input shape"
    lines = [f"wrote {report['path']}: {report['num_classes']} classes, opset {report['opset']}, {axes}, "
             f"{report['exporter']} exporter ({report['export_seconds']:.1f} s)"]
    if not report["verified"]:
        lines.append("parity with PyTorch not checked (--no-verify)")
        return "\n".join(lines)
    lines.append("parity with PyTorch (onnxruntime, CPU, random inputs):")
    for p in report["parity"]:
        h, w = p["size"]
        lines.append(f"  {p['batch']}x3x{h}x{w}: max abs diff {p['max_abs_diff']:.2e}")
    lines.append(f"all within {report['tolerance']:g}")
    return "\n".join(lines)
