"""Pictures of predictions and training: colour masks, overlays, palette PNGs, figures.

Figures are drawn on `matplotlib.figure.Figure` objects rendered by the Agg canvas, never through
``pyplot``: no global figure state, no GUI backend, safe in training loops and on headless
machines. Nothing here imports a model.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data.io import ImageLike, to_rgb_array

Color = Sequence[int]
LabelLike = np.ndarray | torch.Tensor


def colorize(
    label: LabelLike,
    colors: Sequence[Color],
    *,
    ignore_index: int = IGNORE_INDEX,
    ignore_color: Color = (0, 0, 0),
) -> np.ndarray:
    """Paints class ids with their colours: the chapter's ``label2image``.

    Args:
        label: ``(H, W)`` integer class ids (numpy or torch, any device).
        colors: one RGB triple per class.
        ignore_index: the void label, painted ``ignore_color``.
        ignore_color: colour of void pixels and of ids without a colour.

    Returns:
        uint8 array ``(H, W, 3)``.
    """
    ids = _as_label_array(label)
    size = max(len(colors), int(ids.max(initial=0)) + 1, ignore_index + 1)
    # One spare row past the ids, in the void colour, for negative ids.
    lut = np.tile(np.asarray(ignore_color, dtype=np.uint8), (size + 1, 1))
    if colors:
        lut[: len(colors)] = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if 0 <= ignore_index < size:
        lut[ignore_index] = np.asarray(ignore_color, dtype=np.uint8)
    return lut[np.where(ids < 0, size, ids)]


def overlay(
    image: ImageLike,
    label: LabelLike,
    colors: Sequence[Color],
    alpha: float = 0.5,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Blends the class colours over a photo; void pixels show the photo unchanged.

    Args:
        image: the photo (path, PIL image, ``(H, W, 3)`` array or ``(3, H, W)`` tensor).
        label: ``(H, W)`` class ids of the same size.
        colors: one RGB triple per class.
        alpha: weight of the class colour (0 = photo only, 1 = mask only).

    Returns:
        uint8 array ``(H, W, 3)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    photo = to_rgb_array(image)
    ids = _as_label_array(label)
    if photo.shape[:2] != ids.shape:
        raise ValueError(f"image is {photo.shape[0]}x{photo.shape[1]} but label is {ids.shape[0]}x{ids.shape[1]}")
    painted = colorize(ids, colors, ignore_index=ignore_index).astype(np.float32)
    blended = photo.astype(np.float32) * (1 - alpha) + painted * alpha
    keep = (ids == ignore_index) | (ids < 0) | (ids >= len(colors))
    blended[keep] = photo[keep]
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


PNG_COMPRESS_LEVEL = 1  # zlib level of written PNGs: 3.5x as fast to encode as Pillow's 6, files ~10% larger


def save_label_png(label: LabelLike, colors: Sequence[Color], file) -> None:
    """Writes class ids as the palette PNG `fcnseg predict` writes (`palette_image`, zlib level 1) to a
    path or a binary file object: one encoder, so the server's masks are byte for byte predict's."""
    palette_image(label, colors).save(file, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def palette_image(label: LabelLike, colors: Sequence[Color], *, ignore_color: Color = (0, 0, 0)) -> Image.Image:
    """A mode-"P" PIL image whose pixel values are the class ids and whose palette is ``colors``.

    Palette entries past the classes (the void id 255 among them) get ``ignore_color``.

    Raises:
        ValueError: ids outside 0..255, or more than 256 colours.
    """
    ids = _as_label_array(label)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"a palette PNG holds ids 0..255, got {ids.min()}..{ids.max()}")
    if len(colors) > 256:
        raise ValueError(f"a palette holds at most 256 colours, got {len(colors)}")
    palette = np.empty((256, 3), dtype=np.uint8)
    palette[:] = np.asarray(ignore_color, dtype=np.uint8)
    if colors:
        palette[: len(colors)] = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(palette.ravel().tolist())
    return image


def save_palette_png(label: LabelLike, colors: Sequence[Color], path: str | os.PathLike) -> Path:
    """Saves class ids as a palette PNG (like VOC's SegmentationClass files).

    Viewers show the class colours, and ``np.asarray(Image.open(path))`` gives back the ids.
    """
    path = _prepare(path)
    palette_image(label, colors).save(path, format="PNG", optimize=False)
    return path


def save_rgb_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Saves an ``(H, W, 3)`` uint8 array (e.g. `colorize` or `overlay` output) as a PNG."""
    path = _prepare(path)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(path, format="PNG")
    return path


def legend_handles(classes: Sequence[str], colors: Sequence[Color]) -> list[Patch]:
    """Matplotlib legend patches, one per class, for ``fig.legend(handles=...)``."""
    return [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="0.3", label=name) for name, c in zip(classes, colors)]


def legend_image(classes: Sequence[str], colors: Sequence[Color], *, columns: int | None = None) -> np.ndarray:
    """A picture of the class colours with their names.

    Returns:
        uint8 array ``(H, W, 3)``.
    """
    columns = columns or min(len(classes), 4) or 1
    rows = math.ceil(len(classes) / columns)
    fig = Figure(figsize=(2.2 * columns, 0.35 * rows + 0.3), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fig.legend(handles=legend_handles(classes, colors), loc="center", ncol=columns, frameon=False)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_prediction_grid(
    rows: Sequence[tuple[ImageLike, LabelLike, LabelLike | None]],
    classes: Sequence[str],
    colors: Sequence[Color],
    path: str | os.PathLike,
    titles: Sequence[str] = ("image", "prediction", "ground truth"),
    *,
    ignore_index: int = IGNORE_INDEX,
) -> Path:
    """A figure of rows image | prediction | ground truth, as in the chapter, with a class legend.

    The ground-truth column appears when any row has a target; rows without one leave it blank.
    Void pixels are black. The legend lists the classes present in the predictions and targets
    (all classes when there are few).

    Args:
        rows: ``(image, pred, target or None)`` per image; pred and target are ``(H, W)`` ids.
        classes: class names.
        colors: one RGB triple per class.
        path: the PNG to write.
        titles: column titles.
    """
    if not rows:
        raise ValueError("no rows to draw")
    with_target = any(target is not None for _, _, target in rows)
    ncols = 3 if with_target else 2
    first = to_rgb_array(rows[0][0])
    aspect = first.shape[1] / max(first.shape[0], 1)
    cell_h = 2.4
    fig = Figure(figsize=(ncols * cell_h * min(max(aspect, 0.5), 2.5), len(rows) * cell_h + 0.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    present: set[int] = set()
    for r, (image, pred, target) in enumerate(rows):
        pred_ids = _as_label_array(pred)
        panels = [to_rgb_array(image), colorize(pred_ids, colors, ignore_index=ignore_index)]
        present.update(np.unique(pred_ids).tolist())
        if with_target:
            if target is None:
                panels.append(None)
            else:
                target_ids = _as_label_array(target)
                present.update(np.unique(target_ids).tolist())
                panels.append(colorize(target_ids, colors, ignore_index=ignore_index))
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.set_axis_off()
            if panel is not None:
                ax.imshow(panel, interpolation="nearest")
            elif c == 2:
                ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes, color="0.5")
            if r == 0 and c < len(titles):
                ax.set_title(titles[c])
    shown = [i for i in range(len(classes)) if i in present] if len(classes) > 12 else list(range(len(classes)))
    handles = legend_handles([classes[i] for i in shown], [colors[i] for i in shown])
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, fontsize="small")
    legend_rows = math.ceil(len(handles) / 6) if handles else 0
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.35 / fig.get_figheight(),
                        bottom=(0.3 * legend_rows + 0.1) / fig.get_figheight(), wspace=0.04, hspace=0.06)
    return _save(fig, path)


# The panels of `plot_curves`, left to right; `_panel_of` sends each record key to one.
_CURVE_PANELS = ("loss", "pixel accuracy", "mIoU", "learning rate")


def _panel_of(key: str) -> str | None:
    if key.endswith("loss"):
        return "loss"
    if "pixel_acc" in key:
        return "pixel accuracy"
    if key.endswith("miou"):
        return "mIoU"
    if key == "lr":
        return "learning rate"
    return None


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Training curves: loss, pixel accuracy and mIoU (and learning rate, when logged) panels.

    Each record is one log line, e.g. ``{"epoch": 1, "iteration": 100, "train_loss": 0.9,
    "val_loss": 0.8, "pixel_acc": 0.8, "miou": 0.5, "lr": 0.01}``; any key may be missing from any
    record. Keys ending in ``loss`` share the loss panel, keys containing ``pixel_acc`` the accuracy
    panel, keys ending in ``miou`` the mIoU panel. The x axis is the iteration when every record
    has one, else the epoch when every record has one, else the record's position.

    Args:
        records: the training history.
        path: the PNG to write.
    """
    x_key = next((k for k in ("iteration", "epoch") if records and all(k in r for r in records)), None)
    series: dict[str, list[tuple[float, float]]] = {}
    for position, record in enumerate(records):
        x = record[x_key] if x_key else position + 1
        for key, value in record.items():
            if key in ("epoch", "iteration") or _panel_of(key) is None or not _is_number(value):
                continue
            series.setdefault(key, []).append((float(x), float(value)))
    panels = [p for p in _CURVE_PANELS if p != "learning rate" or "lr" in series]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.set_title(panel)
        ax.set_xlabel(x_key or "record")
        ax.grid(True, alpha=0.3)
        keys = [k for k in series if _panel_of(k) == panel]
        for key in keys:
            xs, ys = zip(*series[key])
            # A single point draws no line; a marker keeps short histories visible.
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        if keys:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
        if panel in ("pixel accuracy", "mIoU") and keys:
            ax.set_ylim(0, 1)
        if panel == "learning rate" and keys and all(y > 0 for _, y in series["lr"]):
            ax.set_yscale("log")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(
    cm: np.ndarray | torch.Tensor,
    classes: Sequence[str],
    path: str | os.PathLike,
    normalize: bool = True,
) -> Path:
    """The confusion matrix as a heat map: rows are true classes, columns predicted classes.

    Args:
        cm: ``(C, C)`` counts, ``cm[i, j]`` = pixels of class i predicted as j.
        classes: the C class names.
        path: the PNG to write.
        normalize: divide each row by its total (per-class recall on the diagonal); rows of classes
            absent from the truth stay zero.
    """
    matrix = cm.detach().cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)
    matrix = matrix.astype(np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(classes):
        raise ValueError(f"expected a ({len(classes)}, {len(classes)}) matrix, got {matrix.shape}")
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2.5), 18.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    shown = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classes), rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(n), labels=list(classes), fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (rows normalised)" if normalize else ""))
    if n <= 25:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                value = matrix[i, j]
                text = f"{value:.2f}" if normalize else f"{int(value)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6 if n > 12 else 8,
                        color="white" if value > threshold else "black")
    fig.tight_layout()
    return _save(fig, path)


def _as_label_array(label: LabelLike) -> np.ndarray:
    array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"expected a label map (H, W), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0):
            return array.astype(np.int64)
        raise ValueError(f"expected integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _is_number(value: Any) -> bool:
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return numeric and math.isfinite(value)


def _prepare(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = _prepare(path)
    fig.savefig(path, format="png")
    return path
