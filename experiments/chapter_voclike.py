"""The chapter's recipes on synthetic VOC-like data, in the chapter's terms (docs/CHAPTER.md).

    python experiments/chapter_voclike.py                      # writes the data, trains, prints the table
    python experiments/chapter_voclike.py --dry-run            # the commands only

VOC2012 cannot be downloaded here, so this writes a stand-in with VOC's shape: a
``VOCdevkit/VOC2012`` tree (JPEG photos, palette masks in VOC's colours with 21 classes and the 255
border around every object, ``ImageSets/Segmentation/{train,val}.txt``) of procedural scenes
(`fcnseg.data.synthetic.draw_scene`), about VOC's image size (375x500), with one image in ten
smaller than the chapter's 320x480 crop so that the recipe drops some as the chapter's reader does
on VOC. Then ``fcnseg train --dataset voc2012 --recipe d2l|d2l-mxnet|d2l-jax`` reads it exactly as it
reads VOC2012 and prints the chapter's loss, train acc and test acc; the table lands in
``OUT/table.md``. The scenes are not photographs: the rows show that the recipes run and what they
print on VOC's format, not what they score on VOC.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fcnseg.data.synthetic import draw_scene
from fcnseg.data.voc import VOC_CLASSES, VOC_COLORMAP
from fcnseg.visualize import save_palette_png

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
from repo_paths import repo_relative, shared_data_dir  # noqa: E402 - the experiments' own helpers

VOC_SIZE = (375, 500)  # VOC2012's most common image size
SMALL_SIZE = (300, 400)  # smaller than the chapter's crop: dropped, as VOC's small images are
SMALL_EVERY = 10
MNV2_WEIGHTS = "weights/mobilenet_v2_imagenet_features.pth"


def write_voclike(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """``root/VOCdevkit/VOC2012`` with ``n_train`` + ``n_val`` scenes; an existing tree is kept."""
    base = root / "VOCdevkit" / "VOC2012"
    lists = base / "ImageSets" / "Segmentation"
    if (lists / "val.txt").exists():
        return base
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    lists.mkdir(parents=True, exist_ok=True)
    names = {"train": [f"2026_{i:06d}" for i in range(n_train)],
             "val": [f"2026_{n_train + i:06d}" for i in range(n_val)]}
    rng = np.random.default_rng(seed)
    for index, name in enumerate(names["train"] + names["val"]):
        size = SMALL_SIZE if index % SMALL_EVERY == SMALL_EVERY - 1 else VOC_SIZE
        image, mask = draw_scene(rng, len(VOC_CLASSES), *size)
        Image.fromarray(image).save(base / "JPEGImages" / f"{name}.jpg", quality=90)
        save_palette_png(mask, VOC_COLORMAP, base / "SegmentationClass" / f"{name}.png")
    for split, ids in names.items():
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (lists / "trainval.txt").write_text("".join(f"{i}\n" for i in names["train"] + names["val"]))
    return base


def rows() -> dict[str, list[str]]:
    """Row name -> the recipe's options (with the body this machine has)."""
    mnv2 = str(shared_data_dir() / MNV2_WEIGHTS)
    return {
        "d2l, ResNet-18 random": ["--recipe", "d2l", "--weights-backbone", "none"],
        "d2l, MobileNetV2 ImageNet": ["--recipe", "d2l", "--model", "fcn_mobilenet_v2", "--weights-backbone", mnv2],
        "d2l-mxnet, MobileNetV2 ImageNet": ["--recipe", "d2l-mxnet", "--model", "fcn_mobilenet_v2",
                                            "--weights-backbone", mnv2],
        "d2l-jax, ResNet-18 random": ["--recipe", "d2l-jax", "--weights-backbone", "none"],
    }


def slug(name: str) -> str:
    return name.replace(", ", "-").replace(" ", "-").lower()


def last_record(run: Path) -> dict:
    """The last epoch's record of a run's metrics.jsonl."""
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


def table(results: dict[str, tuple[list[str], dict]]) -> str:
    head = ("| row | loss | train acc | test acc | examples/sec | whole-image val mIoU | command |\n"
            "|---|---|---|---|---|---|---|\n| the chapter (published, VOC2012, ResNet-18 ImageNet) | 0.426 | 0.867 | "
            "0.851 | (GPUs) | | |\n")
    body = ""
    for name, (argv, rec) in results.items():
        command = "fcnseg " + " ".join(repo_relative(a) for a in argv)
        body += (f"| {name} | {rec.get('train_loss', float('nan')):.3f} | {rec.get('train_acc', float('nan')):.3f} | "
                 f"{rec.get('test_acc', float('nan')):.3f} | {rec.get('examples_per_sec', float('nan')):.1f} | "
                 f"{rec.get('miou', float('nan')):.3f} | `{command}` |\n")
    return head + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "chapter-voclike"), help="data, runs and table")
    parser.add_argument("--n-train", type=int, default=240, help="training scenes (VOC2012 has 1464)")
    parser.add_argument("--n-val", type=int, default=60, help="val scenes (VOC2012 has 1449)")
    parser.add_argument("--only", nargs="*", help="row names (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    results = {}
    for name, options in rows().items():
        if args.only and name not in args.only:
            continue
        run = out / slug(name)
        argv = ["train", *options, "--dataset", "voc2012", "--root", str(data), "--seed", "0", "--no-progress",
                "--out", str(run)]
        print("fcnseg " + " ".join(repo_relative(a) for a in argv), flush=True)
        if args.dry_run:
            continue
        write_voclike(data, args.n_train, args.n_val)
        if not (run / "metrics.json").exists():
            subprocess.run([sys.executable, "-m", "fcnseg", *argv], check=True)
        results[name] = (argv, last_record(run))
    if results:
        text = table(results)
        (out / "table.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
