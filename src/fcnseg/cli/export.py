"""`fcnseg export`: a checkpoint as an ONNX model, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import argparse
from pathlib import Path

from fcnseg.cli import options
from fcnseg.errors import OptionError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fcnseg.export import DEFAULT_OPSET, DEFAULT_SIZES, DEFAULT_TOLERANCE, EXPORTERS

    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX and check it against PyTorch",
        formatter_class=options.DefaultsHelpFormatter,
        description="Writes an ONNX model (input 'image' (N, 3, H, W) normalised, output 'logits' (N, C, H, W), "
                    "N, H and W dynamic) with the class names, colours, mean and std in its metadata, after "
                    "checking that onnxruntime matches PyTorch on random inputs of each --sizes.")
    p.add_argument("checkpoint", help="a checkpoint written by fcnseg train")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="only onnx for now")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.export.onnx import export_onnx

    checkpoint = options.check_input_file(args.checkpoint, "checkpoint")
    if args.exporter == "dynamo" and args.opset < 18:
        raise OptionError(f"--opset {args.opset}: the dynamo exporter writes opset 18 or later; "
                          "give --opset 18 or more, or --exporter legacy")
    out = options.check_output_file(Path(args.out) if args.out else checkpoint.with_suffix(".onnx"))
    print(f"exporting {checkpoint} with the {args.exporter} exporter (opset {args.opset})...", flush=True)
    report = export_onnx(checkpoint, out, opset=args.opset, dynamic=not args.static, verify=args.verify,
                         sizes=args.sizes, exporter=args.exporter, tolerance=args.tolerance)
    print(format_report(report))
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
