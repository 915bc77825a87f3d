"""`fcnseg export`: a checkpoint as an ONNX model, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import argparse
from pathlib import Path

from fcnseg.errors import FcnsegError
from fcnseg.training.config import parse_size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fcnseg.export import DEFAULT_OPSET, DEFAULT_SIZES, DEFAULT_TOLERANCE, EXPORTERS

    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX and check it against PyTorch",
        description="Writes an ONNX model (input 'image' (N, 3, H, W) normalised, output 'logits' (N, C, H, W), "
                    "N, H and W dynamic) with the class names, colours, mean and std in its metadata, after "
                    "checking that onnxruntime matches PyTorch on random inputs of each --sizes.")
    p.add_argument("checkpoint", help="a checkpoint written by fcnseg train")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="only onnx for now")
    p.add_argument("--out", help="the .onnx file; the checkpoint's path with .onnx if not given")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (%(default)s; dynamo needs 18+)")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="dynamo (default): torch's maintained exporter; legacy: the deprecated TorchScript one, "
                        "about 20 times faster, same results")
    sizes = " ".join(f"{h}x{w}" for h, w in DEFAULT_SIZES)
    p.add_argument("--sizes", nargs="+", type=_size, default=list(DEFAULT_SIZES), metavar="HxW",
                   help=f"input sizes on which onnxruntime must match PyTorch ({sizes})")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest allowed absolute logit difference (%(default)g)")
    p.add_argument("--static", action="store_true", help="fix the input to 1x3x(first size) instead of dynamic N, H, W")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime parity check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.export import export_onnx

    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx")
    print(f"exporting {args.checkpoint} with the {args.exporter} exporter (opset {args.opset})...", flush=True)
    report = export_onnx(args.checkpoint, out, opset=args.opset, dynamic=not args.static, verify=not args.no_verify,
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


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except FcnsegError as err:  # argparse reports ArgumentTypeError as a usage error
        raise argparse.ArgumentTypeError(str(err)) from None
