"""`fcnseg serve`: a local web page (upload a photo, see the prediction) and an HTTP API over a checkpoint.

Safe by default: it listens on 127.0.0.1 (this machine only) unless ``--host`` says otherwise;
uploads above ``--max-upload-mb`` or ``--max-pixels`` are refused with a 413 answer, and a file
that is not an image with a 400, while the server goes on serving. Needs the ``[serve]`` extra.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fcnseg.cli import options
from fcnseg.constants import DEFAULT_BACKEND
from fcnseg.errors import OptionError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fcnseg.constants import SERVE_HOST, SERVE_MAX_PIXELS, SERVE_MAX_UPLOAD_BYTES, SERVE_PORT
    from fcnseg.inference.backends import backend_names

    p = subparsers.add_parser(
        "serve", help="a local web page and HTTP API to segment photos", formatter_class=options.DefaultsHelpFormatter,
        description="Serves a page where you drop a photo and see the prediction over it (opacity slider, legend "
                    "with each class's share, sliding window and flip switches, the mask PNG to download), and an "
                    "API: POST /api/predict (multipart field 'image') returns the palette PNG mask that fcnseg "
                    "predict writes; GET /api/info returns the classes and colours. Needs pip install "
                    "'fcnseg[serve]'.")
    p.add_argument("checkpoint", metavar="CKPT|MODEL_DIR", help="a checkpoint written by fcnseg train, or a model folder")
    p.add_argument("--host", default=SERVE_HOST,
                   help="address to listen on; 127.0.0.1 is this machine only, 0.0.0.0 every network interface")
    p.add_argument("--port", type=options.positive_int, default=SERVE_PORT, help="TCP port, 1 to 65535")
    p.add_argument("--images", metavar="DIR", help="a folder of photos the page offers to pick")
    p.add_argument("--max-upload-mb", type=options.positive_float, default=SERVE_MAX_UPLOAD_BYTES / 2**20,
                   metavar="MB", help="refuse uploads larger than this (MiB)")
    p.add_argument("--max-pixels", type=options.non_negative_int, default=SERVE_MAX_PIXELS, metavar="N",
                   help="refuse photos of more than N pixels (width x height), from their header, before decoding; "
                        "0: no cap")
    options.add_window_options(p)
    p.add_argument("--batch-size", type=options.positive_int, default=8, metavar="N",
                   help="windows per forward pass in sliding mode")
    p.add_argument("--backend", choices=backend_names(), default=DEFAULT_BACKEND,
                   help="the engine running the model; auto (the default): OpenVINO where installed "
                        "(pip install 'fcnseg[openvino]'), else torch")
    options.add_device_option(p)
    options.add_amp_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.runtime import select_device
    from fcnseg.serving.server import check_address, is_loopback, require_web_libraries, run_server

    require_web_libraries()
    from fcnseg.models.checkpoint import check_checkpoint_path

    check_checkpoint_path(args.checkpoint)
    images = options.check_input_folder(args.images, "--images") if args.images else None
    if args.port > 65535:
        raise OptionError(f"--port must be at most 65535, got {args.port}")
    check_address(args.host, args.port)  # a taken port is said before the model loads
    device = select_device(args.device)
    # The reader's process-wide cap follows --max-pixels, so that a raised cap is not refused by it.
    with options.max_pixels(args.max_pixels):
        app = _build_app(args, device, images)
        where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/"
        print(f"fcnseg serve: {args.checkpoint} on {device}; open {where} (Ctrl-C stops)", flush=True)
        if not is_loopback(args.host):
            print(f"fcnseg: warning: listening on {args.host}: other machines can reach this server; "
                  "it has no authentication", file=sys.stderr, flush=True)
        run_server(app, args.host, args.port)
    return 0


def _build_app(args: argparse.Namespace, device, images: Path | None):
    """The checkpoint's Segmenter behind a Predictor, in the Starlette app; the window defaults to the training crop.

    Raises:
        OptionError: the stride exceeds the window.
        CheckpointError: the file is not a readable fcnseg checkpoint.
    """
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.inference.windows import DEFAULT_WINDOW, check_window
    from fcnseg.models.checkpoint import load_checkpoint
    from fcnseg.serving.app import create_app
    from fcnseg.serving.predictor import Predictor

    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint.get("config")
    crop = config.get("crop") if isinstance(config, dict) else None
    window = args.window or (tuple(crop) if crop else DEFAULT_WINDOW)
    check_window(window, args.stride)  # the page may switch sliding on, whatever --mode says
    segmenter = Segmenter.from_checkpoint(checkpoint, device=device, mode=args.mode, window=window,
                                          stride=args.stride, flip=args.flip, batch_size=args.batch_size, amp=args.amp,
                                          backend=args.backend)
    del checkpoint
    predictor = Predictor(segmenter, max_upload_bytes=int(args.max_upload_mb * 2**20),
                          max_pixels=args.max_pixels or None)
    return create_app(predictor, images=images)
