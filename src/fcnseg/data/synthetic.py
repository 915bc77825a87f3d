"""Procedural scenes for trying the pipeline without downloading anything.

Each scene is a textured background (class 0) with a few overlapping objects. An object class
is a shape (disc, rectangle, triangle, ring, cross, ellipse, diamond, crescent) painted with a
texture (stripes, checks, dots, shading, speckles) in local coordinates, so both rotate with it.
Colours are only a hint: half of the objects take their class's colour, the others any colour,
and the background borrows the object textures; shape and texture tell the classes apart. The
boundary between regions is void (255), as in VOC.

The result is an ordinary folder dataset (see `fcnseg.data.folder`) with train.txt/val.txt
(80/20). Scene ``i`` depends only on ``seed`` and ``i``, and the files are byte-identical for the
same arguments.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data.classes import default_palette
from fcnseg.errors import DataError

SHAPES = ("disc", "rectangle", "triangle", "ring", "cross", "ellipse", "diamond", "crescent")
TEXTURES = ("striped", "checkered", "dotted", "shaded", "speckled")
# Shape and texture cycle with different periods, so (shape, texture) stays unique for
# lcm(8, 5) = 40 object classes; with up to 5 object classes both differ between any two.
MAX_CLASSES = 1 + int(np.lcm(len(SHAPES), len(TEXTURES)))
VOID_COLOR = (224, 224, 192)
MARKER = "fcnseg synthetic dataset"


def synthetic_classes(num_classes: int) -> list[str]:
    """Class names: "background", then "striped disc", "checkered rectangle", ..."""
    return ["background"] + [f"{TEXTURES[c % len(TEXTURES)]} {SHAPES[c % len(SHAPES)]}" for c in range(num_classes - 1)]


def make_synthetic(
    out: str | os.PathLike,
    num_classes: int = 5,
    n: int = 200,
    size: tuple[int, int] = (128, 160),
    seed: int = 0,
    *,
    progress: bool = True,
) -> Path:
    """Writes ``n`` procedural scenes as a folder dataset.

    Args:
        out: the folder to create; it must be empty, missing, or an earlier synthetic dataset
            (whose images, masks and lists are replaced).
        num_classes: classes including background, 2 .. 41.
        n: number of scenes; every 5th (4, 9, 14...) goes to val.txt, the rest to train.txt
            (with 2 to 4 scenes the last one is val; a single scene is train only).
        size: (height, width) of every scene, at least 16x16.
        seed: scenes are a function of (seed, index) only.
        progress: show progress (a bar on a terminal, plain lines otherwise).

    Returns:
        ``out``.

    Raises:
        DataError: bad arguments, or ``out`` holds something else.
    """
    from fcnseg.progress import progress_bar

    out = Path(out)
    height, width = (int(v) for v in size)
    if not 2 <= num_classes <= MAX_CLASSES:
        raise DataError(f"synthetic datasets have 2 to {MAX_CLASSES} classes (background included), not {num_classes}")
    if n < 1:
        raise DataError(f"the number of scenes must be at least 1, not {n}")
    if height < 16 or width < 16:
        raise DataError(f"scenes must be at least 16x16 pixels, not {height}x{width}")
    _prepare(out)
    names = synthetic_classes(num_classes)
    colors = default_palette(num_classes)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:num_classes] = colors
    palette[IGNORE_INDEX] = VOID_COLOR
    digits = max(5, len(str(n - 1)))
    stems = [f"{i:0{digits}d}" for i in range(n)]
    for i in progress_bar(range(n), desc=f"writing {out}", unit="scene", disable=not progress):
        image, mask = draw_scene(np.random.default_rng([seed, i]), num_classes, height, width)
        Image.fromarray(image, "RGB").save(out / "images" / f"{stems[i]}.png")
        mask_png = Image.fromarray(mask, "P")
        mask_png.putpalette(palette.ravel().tolist())
        mask_png.save(out / "masks" / f"{stems[i]}.png")
    val = [s for i, s in enumerate(stems) if i % 5 == 4]
    if not val and n >= 2:
        val = stems[-1:]  # fewer than 5 scenes: still a non-empty val split to evaluate on
    val_set = set(val)
    train = [s for s in stems if s not in val_set]
    (out / "train.txt").write_text("".join(f"{s}\n" for s in train))
    (out / "val.txt").write_text("".join(f"{s}\n" for s in val))
    lines = [f"description: {MARKER}, num_classes={num_classes} n={n} size={height}x{width} seed={seed}",
             "classes:"] + [f"  - {name}" for name in names] + ["colors:"] + [f"  - [{r}, {g}, {b}]" for r, g, b in colors]
    lines += [f"ignore_index: {IGNORE_INDEX}", ""]
    (out / "classes.yaml").write_text("\n".join(lines))
    return out


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        classes_file = out / "classes.yaml"
        if not (classes_file.is_file() and MARKER in classes_file.read_text(errors="replace")):
            raise DataError(f"{out} is not empty; choose a new folder (only an earlier synthetic dataset is overwritten)")
        for sub in ("images", "masks"):
            for stale in (out / sub).glob("*.png"):
                stale.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)


def draw_scene(rng: np.random.Generator, num_classes: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws one scene.

    Returns:
        image uint8 (H, W, 3) and mask uint8 (H, W) with ids 0 .. num_classes - 1 and 255 on boundaries.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, yy, xx)
    label = np.zeros((height, width), dtype=np.uint8)
    scale = min(height, width)
    for _ in range(int(rng.integers(2, 7))):  # later objects occlude earlier ones
        cls = int(rng.integers(1, num_classes))
        radius = scale * rng.uniform(0.1, 0.24)
        cy, cx = rng.uniform(-0.1, 1.1) * height, rng.uniform(-0.1, 1.1) * width  # some cut by the border
        angle = rng.uniform(0, 2 * np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        inside = _shape(SHAPES[(cls - 1) % len(SHAPES)], u, v, radius)
        if not inside.any():
            continue
        texture = _texture(TEXTURES[(cls - 1) % len(TEXTURES)], rng, u, v, radius)
        base = _class_colour(cls) if rng.random() < 0.5 else rng.uniform(30, 225, 3)
        image[inside] = _paint(rng, base, texture)[inside]
        label[inside] = cls
    # Boundary pixels (a neighbour with another label) are void, like VOC's outlines.
    edge = np.zeros_like(label, dtype=bool)
    edge[:-1] |= label[:-1] != label[1:]
    edge[1:] |= label[:-1] != label[1:]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:, 1:] |= label[:, :-1] != label[:, 1:]
    label[edge] = IGNORE_INDEX
    image += rng.normal(0, 8, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8), label


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    height, width = yy.shape
    # Smooth blotches: a coarse random grid upsampled bilinearly.
    coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse, "RGB").resize((width, height), Image.BILINEAR), dtype=np.float32)
    base = rng.uniform(40, 215, 3).astype(np.float32)
    image = 0.5 * blotches + 0.5 * base
    if rng.random() < 0.5:  # borrow an object texture, so texture alone does not mean "object"
        angle = rng.uniform(0, 2 * np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        texture = _texture(TEXTURES[int(rng.integers(len(TEXTURES)))], rng, u, v, min(height, width) * 0.2)
        image += (texture[..., None] - 0.5) * rng.uniform(20, 50)
    return image


def _shape(name: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    d2 = u * u + v * v
    if name == "disc":
        return d2 <= r * r
    if name == "rectangle":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.6 * r)
    if name == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            phi = np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(phi) + v * np.sin(phi) <= 0.5 * r
        return inside
    if name == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if name == "cross":
        return ((np.abs(u) <= r) & (np.abs(v) <= 0.28 * r)) | ((np.abs(v) <= r) & (np.abs(u) <= 0.28 * r))
    if name == "ellipse":
        return (u / r) ** 2 + (v / (0.45 * r)) ** 2 <= 1
    if name == "diamond":
        return np.abs(u) / r + np.abs(v) / (0.6 * r) <= 1
    if name == "crescent":
        return (d2 <= r * r) & ((u - 0.45 * r) ** 2 + v * v > (0.8 * r) ** 2)
    raise ValueError(name)


def _texture(name: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """A pattern in [0, 1] over local coordinates (u, v)."""
    period = rng.uniform(4, 8)
    if name == "striped":
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    if name == "checkered":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if name == "dotted":
        cu, cv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return (cu * cu + cv * cv <= (period / 3.2) ** 2).astype(np.float32)
    if name == "shaded":
        return np.clip(0.5 + 0.5 * u / r, 0, 1)
    if name == "speckled":
        return (rng.random(u.shape) < 0.3).astype(np.float32)
    raise ValueError(name)


def _class_colour(cls: int) -> np.ndarray:
    # Hues spread by the golden ratio, so neighbouring class ids get unlike colours.
    hue = (cls * 0.618034) % 1.0
    rgb = np.asarray(Image.new("HSV", (1, 1), (int(hue * 255), 190, 200)).convert("RGB"), dtype=np.float32)[0, 0]
    return rgb


def _paint(rng: np.random.Generator, base: np.ndarray, texture: np.ndarray) -> np.ndarray:
    # The texture blends the base colour with a darker or lighter shade of it.
    shade = base * rng.uniform(0.35, 0.6) if rng.random() < 0.5 else base + (255 - base) * rng.uniform(0.4, 0.7)
    base = base + rng.normal(0, 12, 3)
    return base[None, None, :] * (1 - texture[..., None]) + shade[None, None, :] * texture[..., None]
