"""The chapter's sanity check: an image upsampled x2 by the transposed conv with bilinear weights.

    python docs/figures/make_bilinear_figure.py [IMAGE] [--out docs/figures/bilinear_x2.png]

Without IMAGE it draws a synthetic scene (the repository carries no third-party photos).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from fcnseg.models.upsample import TransposedConvUpsampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", nargs="?")
    parser.add_argument("--out", default=str(Path(__file__).with_name("bilinear_x2.png")))
    args = parser.parse_args()
    if args.image:
        photo = np.array(Image.open(args.image).convert("RGB"))
    else:
        from fcnseg.data.synthetic import make_synthetic

        with tempfile.TemporaryDirectory() as tmp:
            root = make_synthetic(Path(tmp) / "scenes", num_classes=5, n=1, size=(120, 160), seed=3, progress=False)
            photo = np.array(Image.open(next((root / "images").iterdir())).convert("RGB"))
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    # the chapter: ConvTranspose2d(3, 3, kernel_size=4, padding=1, stride=2) with bilinear_kernel(3, 3, 4)
    with torch.no_grad():
        y = TransposedConvUpsampler(3, 2, "bilinear")(x)[0].permute(1, 2, 0).clamp(0, 1).numpy()
    fig = Figure(figsize=(10, 4.2), dpi=100)
    for i, (img, title) in enumerate([(photo, f"input {photo.shape[0]}x{photo.shape[1]}"),
                                      (y, f"transposed conv x2, bilinear init: {y.shape[0]}x{y.shape[1]}")]):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(img)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"input {tuple(photo.shape)}, output {tuple(y.shape)}: wrote {args.out}")


if __name__ == "__main__":
    main()
