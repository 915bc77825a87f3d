"""The report as one self-contained HTML page: every figure embedded as a ``data:`` URI, no script, no link out.

Figures are drawn by `fcnseg.visualize` (the same curves and confusion matrix as a run folder's
curves.png and confusion.png) and embedded; images are shrunk to thumbnails so that a report of a
hundred images stays a few megabytes.
"""
from __future__ import annotations

import base64
import html
import io
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from fcnseg.visualize import colorize, plot_confusion_matrix, plot_curves

THUMBNAIL_SIDE = 240  # pixels, the longer side of each image in the per-image rows

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; margin: 24px auto;
       max-width: 1100px; padding: 0 16px; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2em; border-bottom: 1px solid #dde; }
.summary td, .iou td, .iou th { padding: 3px 10px; text-align: left; }
.iou td.num, .iou th.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { background: #e6e9ef; width: 220px; height: 12px; } .bar div { background: #2f6fdf; height: 12px; }
.swatch { display: inline-block; width: 13px; height: 13px; border: 1px solid #555; vertical-align: middle; }
figure { margin: 0; } img.figure { max-width: 100%; }
.legend span { margin-right: 14px; white-space: nowrap; }
.image { display: grid; grid-template-columns: 170px repeat(3, minmax(0, 1fr)); gap: 8px; align-items: center;
         padding: 8px 0; border-bottom: 1px solid #eceef2; }
.image img { max-width: 100%; image-rendering: pixelated; }
.image .score { font-variant-numeric: tabular-nums; }
.image.head { font-weight: 600; padding: 4px 0; }
.muted { color: #7a8296; }
"""


@dataclass
class ReportContent:
    """Everything the page shows.

    Attributes:
        title: the run's name.
        facts: (label, value) lines of the summary table.
        classes, colors: the model's classes.
        metrics: metrics of all the evaluated images together (`SegmentationMetrics`).
        truth_pixels: labelled pixels of each class in the evaluated images.
        history: metrics.jsonl's records, for the curves.
        confusion: the (C, C) confusion matrix of the evaluated images.
        images: `ImageResult` list, worst first, whose ``panels`` are three data URIs.
    """

    title: str
    facts: list[tuple[str, str]]
    classes: list[str]
    colors: list[Sequence[int]]
    metrics: Any
    truth_pixels: list[int]
    history: list[dict[str, Any]]
    confusion: np.ndarray
    images: list[Any] = field(default_factory=list)


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...``: a file inside the page."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnails(colors: Sequence[Sequence[int]], ignore_index: int,
               side: int = THUMBNAIL_SIDE) -> Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[str, str, str]]:
    """``keep`` for `evaluate_images`: image | prediction | ground truth as small embedded pictures.

    The photo becomes a JPEG, the label maps PNGs in the class colours (void black), all with the
    longer side at most ``side`` (label maps resized by nearest neighbour: no invented colours).
    """

    def keep(image: np.ndarray, pred: np.ndarray, target: np.ndarray) -> tuple[str, str, str]:
        height, width = image.shape[:2]
        scale = min(1.0, side / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        photo = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)
        pictures = [_encode(photo, "JPEG", quality=85)]
        for label in (pred, target):
            painted = Image.fromarray(colorize(label, colors, ignore_index=ignore_index))
            pictures.append(_encode(painted.resize(size, Image.Resampling.NEAREST), "PNG"))
        return pictures[0], pictures[1], pictures[2]

    return keep


def _encode(image: Image.Image, kind: str, **options: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return data_uri(buffer.getvalue(), "image/jpeg" if kind == "JPEG" else "image/png")


def figure_uris(content: ReportContent) -> tuple[str | None, str]:
    """The training curves (None without a history) and the confusion matrix, as embedded PNGs."""
    with tempfile.TemporaryDirectory(prefix="fcnseg-report-") as folder:
        curves = None
        if content.history:
            curves = data_uri(plot_curves(content.history, Path(folder) / "curves.png").read_bytes(), "image/png")
        matrix = plot_confusion_matrix(content.confusion, content.classes, Path(folder) / "confusion.png")
        return curves, data_uri(matrix.read_bytes(), "image/png")


def render(content: ReportContent) -> str:
    """The page's HTML."""
    curves, confusion = figure_uris(content)
    e = html.escape
    parts = [
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>fcnseg report: {e(content.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>fcnseg report: {e(content.title)}</h1>",
        "<table class=\"summary\">" + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in content.facts)
        + "</table>",
        "<h2 id=\"curves\">Training curves</h2>",
        f"<img class=\"figure\" alt=\"training curves\" src=\"{curves}\">" if curves
        else "<p class=\"muted\">no metrics.jsonl in the run folder: no curves</p>",
        "<h2 id=\"iou\">Per-class IoU</h2>", _iou_table(content),
        "<h2 id=\"confusion\">Confusion matrix</h2>",
        f"<img class=\"figure\" alt=\"confusion matrix\" src=\"{confusion}\">",
        "<h2 id=\"images\">Images, worst first</h2>", _legend(content),
        "<p class=\"muted\">the score is the image's own mIoU over the classes in its truth or prediction, "
        "and its pixel accuracy; void pixels of the ground truth are black.</p>",
        "<div class=\"image head\"><div></div><div>image</div><div>prediction</div><div>ground truth</div></div>",
        *(_image_row(rank, result) for rank, result in enumerate(content.images, 1)),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def _iou_table(content: ReportContent) -> str:
    e = html.escape
    rows = ["<table class=\"iou\"><tr><th></th><th>class</th><th class=\"num\">IoU</th><th></th>"
            "<th class=\"num\">accuracy</th><th class=\"num\">pixels in truth</th></tr>"]
    for i, name in enumerate(content.classes):
        iou, acc = content.metrics.per_class_iou[i], content.metrics.per_class_acc[i]
        bar = f"<div class=\"bar\"><div style=\"width:{100 * iou:.1f}%\"></div></div>" if iou is not None else ""
        rows.append(f"<tr><td><span class=\"swatch\" style=\"background:{_hex(content.colors[i])}\"></span></td>"
                    f"<td>{e(name)}</td><td class=\"num\">{_number(iou)}</td><td>{bar}</td>"
                    f"<td class=\"num\">{_number(acc)}</td><td class=\"num\">{content.truth_pixels[i]:,}</td></tr>")
    m = content.metrics
    rows.append(f"<tr><td></td><td><b>mean</b></td><td class=\"num\"><b>{_number(m.miou)}</b></td><td></td>"
                f"<td class=\"num\">{_number(m.mean_acc)}</td><td class=\"num\">{m.num_pixels:,}</td></tr></table>")
    return "".join(rows)


def _legend(content: ReportContent) -> str:
    return "<p class=\"legend\">" + "".join(
        f"<span><span class=\"swatch\" style=\"background:{_hex(c)}\"></span> {html.escape(n)}</span>"
        for n, c in zip(content.classes, content.colors)) + "</p>"


def _image_row(rank: int, result: Any) -> str:
    image, pred, target = result.panels
    name = html.escape(result.name)
    m = result.metrics
    return (f"<div class=\"image\" data-miou=\"{_number(m.miou)}\"><div><b>{rank}.</b> {name}<br>"
            f"<span class=\"score\">mIoU {_number(m.miou)}<br>pixel acc {_number(m.pixel_acc)}</span></div>"
            f"<img alt=\"{name}\" src=\"{image}\"><img alt=\"{name} prediction\" src=\"{pred}\">"
            f"<img alt=\"{name} ground truth\" src=\"{target}\"></div>")


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def _hex(color: Sequence[int]) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in color)
