"""Example predictions of a checkpoint as one PNG: image | prediction | ground truth, a row per image.

    python experiments/prediction_grid.py runs/camvid_mnv2_8s_1h/best.pt --dataset camvid \
        --root ../shared/data/camvid --split val --images 0 25 50 75 --out docs/figures/camvid_val_predictions.png

Whole-image prediction through `fcnseg.inference.Segmenter`, as `fcnseg predict` does it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", required=True, choices=("voc2012", "camvid", "folder"))
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1, 2, 3], help="indices into the split")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from fcnseg.data import build_dataset
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.visualize import save_prediction_grid

    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=args.device)
    dataset = build_dataset(args.dataset, args.root, args.split)
    rows = []
    for index in args.images:
        image, target = dataset.read_pair(index)
        rows.append((image.permute(1, 2, 0).numpy(), segmenter.predict(image), target.numpy()))
    path = save_prediction_grid(rows, segmenter.classes, segmenter.colors, Path(args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
