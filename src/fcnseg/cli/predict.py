"""`fcnseg predict`: label maps, colour overlays and figures for photos and videos, with a checkpoint.

A thin command over `fcnseg.inference.bulk.predict_files`, which streams the inputs (decoded in
DataLoader workers, equal sizes batched), writes each output whole or not at all, keeps
``manifest.jsonl`` as inputs finish, resumes a killed run, and shares the inputs out under torchrun.
Each mistake on the command line is a usage error before any image is predicted.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fcnseg.cli import options
from fcnseg.constants import DEFAULT_BACKEND, OVERLAY_FORMATS
from fcnseg.errors import OptionError

if TYPE_CHECKING:
    import torch

    from fcnseg.inference.segmenter import Segmenter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fcnseg.inference.backends import backend_names

    p = subparsers.add_parser(
        "predict", help="segment images and videos with a checkpoint", formatter_class=options.DefaultsHelpFormatter,
        description="Writes <stem>.png (class ids as a palette PNG in the checkpoint's colours), "
                    "<stem>_overlay.png and, with --grid, <stem>_grid.png for each image (inputs with the same "
                    "stem get <stem>-2... names); <stem>_overlay.mp4 for a video; and OUT/manifest.jsonl: one record "
                    "per input with its outputs. A rerun skips the inputs already done, so an interrupted run "
                    "resumes where it stopped; --overwrite redoes them. Files of another run are replaced only with "
                    "--overwrite. Unreadable files are reported and skipped; the exit status is 1 when any input "
                    "failed. Under torchrun each process predicts its share of the inputs.")
    p.add_argument("checkpoint", help="a checkpoint written by fcnseg train, or a model folder (fcnseg export "
                                      "--format hf)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image or video files, folders of them, or glob patterns")
    p.add_argument("--out", required=True, help="output folder")
    options.add_flag(p, "--overwrite", default=False,
                     help="redo inputs an earlier run finished, and replace files in --out that an earlier run "
                          "wrote for other inputs (or that no manifest.jsonl accounts for)")
    options.add_window_options(p)
    options.add_scales_option(p)
    p.add_argument("--batch-size", type=options.positive_int, default=8, metavar="N",
                   help="images of equal size per forward pass in whole mode; windows per pass in sliding mode")
    p.add_argument("--workers", type=options.non_negative_int, default=0, metavar="N",
                   help="DataLoader worker processes decoding the images (0: a thread of this process reads ahead)")
    options.add_flag(p, "--grid", default=False, help="also write <stem>_grid.png: image | prediction | ground truth")
    options.add_flag(p, "--overlay", default=True, help="write <stem>_overlay.png, or .jpg with --overlay-format jpg (--no-overlay: the label maps only, "
                     "the fastest bulk run)")
    p.add_argument("--overlay-format", choices=OVERLAY_FORMATS, default="png",
                   help="png (lossless) or jpg: <stem>_overlay.jpg, about 10 times as fast to encode, for bulk runs")
    p.add_argument("--masks", help="ground truth for the grid (implies --grid): a folder of masks named like "
                                   "the images, or one mask file for a single input")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay, 0 to 1")
    options.add_flag(p, "--frame-masks", default=False, help="videos: also write the label map of every frame")
    p.add_argument("--backend", choices=backend_names(), default=DEFAULT_BACKEND,
                   help="the engine running the model; auto (the default): OpenVINO where installed "
                        "(pip install 'fcnseg[openvino]'), else torch")
    options.add_flag(p, "--compile", default=False,
                     help="compile the model (torch.compile for the torch backend): slower start, faster after")
    p.add_argument("--calibration", metavar="DIR",
                   help="--backend torch-int8: a folder of images like those to segment, to calibrate the INT8 model")
    p.add_argument("--calibration-images", type=options.positive_int, default=32, metavar="N",
                   help="how many of the calibration folder's images calibrate (spread over the folder)")
    options.add_device_option(p)
    options.add_amp_option(p)
    options.add_max_pixels_option(p)
    options.add_progress_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.inference.bulk import predict_files
    from fcnseg.runtime import select_device
    from fcnseg.training.distributed import cleanup_distributed, setup_distributed

    device = select_device(args.device)
    _check_arguments(args)
    _join_process_group(device.type)
    context = setup_distributed(device.type)
    try:
        if context.enabled and device.type == "cuda":
            import torch

            device = torch.device("cuda", context.local_rank)
        segmenter = _load_segmenter(args, device)
        with options.max_pixels(args.max_pixels):
            result = predict_files(segmenter, args.inputs, args.out, workers=args.workers, overwrite=args.overwrite,
                                   grid=args.grid, overlay=args.overlay, overlay_format=args.overlay_format,
                                   masks=args.masks, alpha=args.alpha,
                                   frame_masks=args.frame_masks, progress=args.progress)
    finally:
        cleanup_distributed()
    if context.is_main:
        skipped = f", {result.skipped} already done" if result.skipped else ""
        print(f"{result.ok} ok, {len(result.failures)} failed{skipped}; outputs in {args.out}, "
              f"listed in {result.manifest}")
        for _, message in result.failures:
            print(f"  failed: {message}")
    return 1 if result.failures else 0


def _join_process_group(device_type: str) -> None:
    """Under torchrun, the process group with a one-day timeout instead of torch's 10 to 30 minutes:
    the ranks meet again only when all have finished their shares, and one share may hold a long
    video or slower images. `setup_distributed` then finds the group made."""
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL picks a device
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(days=1))


def _check_arguments(args: argparse.Namespace) -> None:
    """Every check of the command line that needs no model (each mistake a usage error, before any work).

    Raises:
        OptionError: a bad --alpha, checkpoint path, --out, window or stride, or --masks.
    """
    from fcnseg.inference.windows import check_window
    from fcnseg.models.checkpoint import check_checkpoint_path

    if not 0.0 <= args.alpha <= 1.0:
        raise OptionError(f"--alpha must be between 0 and 1, got {args.alpha}")
    check_checkpoint_path(args.checkpoint)
    options.check_output_folder(args.out)
    if args.mode == "sliding" and args.window is not None:
        check_window(args.window, args.stride)  # with the training crop as the window: once it is known
    if args.masks is not None and not Path(args.masks).exists():
        raise OptionError(f"--masks {args.masks}: no such file or folder")


def _calibration_images(args: argparse.Namespace) -> list:
    """The files of ``--calibration`` (for ``--backend torch-int8``), checked before the model loads.

    Raises:
        OptionError: --calibration without a quantising backend.
        UsageError: the folder is missing or holds no images.
    """
    if args.calibration is None:
        return []
    if args.backend != "torch-int8":
        raise OptionError("--calibration calibrates --backend torch-int8 (for an INT8 ONNX file: fcnseg export "
                          "--int8 --calibration DIR)")
    from fcnseg.export.int8 import calibration_files

    return calibration_files(args.calibration, args.calibration_images)


def _load_segmenter(args: argparse.Namespace, device: torch.device) -> Segmenter:
    """The checkpoint's model as a Segmenter with the command's options; the window defaults to the training crop.

    Raises:
        OptionError: the stride exceeds the window (the training crop when --window is not given), or
            the backend is not installed.
        CheckpointError: the file is not a readable fcnseg checkpoint or model folder.
    """
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.inference.windows import DEFAULT_WINDOW, check_window
    from fcnseg.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint.get("config")
    crop = config.get("crop") if isinstance(config, dict) else None
    window = args.window or (tuple(crop) if crop else DEFAULT_WINDOW)
    if args.mode == "sliding":
        check_window(window, args.stride)
    segmenter = Segmenter.from_checkpoint(checkpoint, device=device, mode=args.mode, window=window, stride=args.stride,
                                          flip=args.flip, scales=tuple(args.scales), batch_size=args.batch_size,
                                          amp=args.amp,
                                          backend=args.backend, compile=args.compile,
                                          calibration=_calibration_images(args))
    del checkpoint  # the model holds its own copy of the weights
    return segmenter
