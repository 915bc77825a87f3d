"""A probe for CamVid's Pole: FCN-4s whose fine skips get convolutions of their own, scored on the holdout.

Outside Q6's rule and outside the library: it trains `fcnseg train`'s run with the skip score
layers at strides 4 and 8 (1x1 convolutions in the FCN) replaced by a small decoder block each,
3x3 conv - BatchNorm - ReLU twice at ``--width`` channels, then the 1x1 scores (zero-initialised,
as the FCN's skips start), and prints the holdout metrics as any run does. Its checkpoints hold the
extra layers, which `fcnseg` cannot rebuild: they are for this comparison only.

    python experiments/decoder_probe.py --width 64 -- --model fcn_mobilenet_v2 --variant 4s ... --holdout 0.2 --out DIR
"""
from __future__ import annotations

import argparse
import sys

from torch import nn

import fcnseg.training.trainer as trainer_module
from fcnseg.cli import main as fcnseg_main

DECODED_SKIPS = ("score4", "score8")


def decoder_block(in_channels: int, num_classes: int, width: int) -> nn.Sequential:
    """Two 3x3 conv - BatchNorm - ReLU layers, then zero-initialised 1x1 class scores."""
    scores = nn.Conv2d(width, num_classes, kernel_size=1)
    nn.init.zeros_(scores.weight)
    nn.init.zeros_(scores.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        scores,
    )


def with_decoder(build_model, width: int):
    """``build_model`` whose FCNs get `decoder_block` in place of their stride-4 and stride-8 skip scores."""
    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        for name in DECODED_SKIPS:
            skip = getattr(model, name, None)
            if skip is not None:
                setattr(model, name, decoder_block(skip.in_channels, skip.out_channels, width))
        return model
    return build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="channels of each decoder block (default: 64)")
    parser.add_argument("train_options", nargs="+", help="fcnseg train options, after --")
    args = parser.parse_args(argv)
    trainer_module.build_model = with_decoder(trainer_module.build_model, args.width)
    return fcnseg_main(["train", *args.train_options])


if __name__ == "__main__":
    sys.exit(main())
