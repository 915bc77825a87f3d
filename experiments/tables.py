"""Markdown and JSON tables of segmentation metrics: one row per run, per-class IoU in columns, the
commands that made them below (with paths relative to the repository, see repo_paths.py)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from repo_paths import command_text, repo_relative


@dataclass
class Row:
    """One line of a table.

    Attributes:
        label: what this row varies, e.g. "ResNet-18 (random init), FCN-32s, Xavier".
        metrics: a metrics.json / eval report: pixel_acc, mean_acc, miou, fwiou, per_class_iou.
        seconds: training time (or evaluation time, as the table's ``time_label`` says).
        run: the run folder or report the numbers come from.
        command: the fcnseg command that made it.
    """

    label: str
    metrics: dict[str, Any]
    seconds: float | None = None
    run: str = ""
    command: list[str] = field(default_factory=list)


def format_seconds(seconds: float | None) -> str:
    """3725 -> '1 h 02 min', 184 -> '3 min 04 s', 12.3 -> '12 s'."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(rows: list[Row], *, time_label: str = "train time") -> str:
    """A GitHub markdown table: setting, mIoU, pixel acc, mean acc, time, then IoU per class (in %).

    The best mIoU is in bold; a class absent from both truth and prediction shows "–".
    """
    classes: list[str] = []
    for row in rows:
        for name in row.metrics.get("per_class_iou", {}):
            if name not in classes:
                classes.append(name)
    best = max((r.metrics.get("miou") for r in rows if r.metrics.get("miou") is not None), default=None)
    header = ["Setting", "mIoU", "pixel acc", "mean acc", time_label, *classes]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        m = row.metrics
        miou = _percent(m.get("miou"))
        if best is not None and m.get("miou") == best and len(rows) > 1:
            miou = f"**{miou}**"
        cells = [row.label, miou, _percent(m.get("pixel_acc")), _percent(m.get("mean_acc")), format_seconds(row.seconds)]
        cells += [_percent(m.get("per_class_iou", {}).get(name)) for name in classes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(out_dir: str | Path, key: str, title: str, caption: str, rows: list[Row], *,
                time_label: str = "train time", settings: dict[str, Any] | None = None,
                notes: list[str] = (), extra_markdown: str = "",
                extra_tables: list[tuple[str, list[Row], str]] = ()) -> tuple[Path, Path]:
    """Writes ``out_dir/table.md`` (title, caption, table, notes, commands) and ``out_dir/table.json``.

    Args:
        extra_tables: ``(heading, rows, time label)`` of further tables printed below the main one
            (e.g. evaluations, whose time column is not a training time); their rows go to table.json
            under ``extra_tables`` and their commands to the list of commands.

    Returns:
        the two paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"### {title}", "", caption, "", markdown_table(rows, time_label=time_label)]
    for heading, extra_rows, extra_time_label in extra_tables:
        parts += ["", heading, "", markdown_table(extra_rows, time_label=extra_time_label)]
    if notes:
        parts += ["", *[f"- {note}" for note in notes]]
    if extra_markdown:
        parts += ["", extra_markdown]
    commands = [row.command for row in [*rows, *(r for _, extra, _ in extra_tables for r in extra)] if row.command]
    if commands:
        parts += ["", "<details><summary>Commands</summary>", "", "```bash",
                  *[command_text(c) for c in commands], "```", "", "</details>"]
    md_path = out_dir / "table.md"
    md_path.write_text("\n".join(parts) + "\n")
    payload = {"table": key, "title": title, "caption": caption, "time_label": time_label,
               "settings": settings or {}, "notes": list(notes), "rows": [_row_record(r) for r in rows]}
    if extra_tables:
        payload["extra_tables"] = [{"heading": heading, "time_label": label, "rows": [_row_record(r) for r in extra]}
                                   for heading, extra, label in extra_tables]
    json_path = out_dir / "table.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    return md_path, json_path


def _row_record(row: Row) -> dict[str, Any]:
    """A row for table.json, its run folder and command with paths relative to the repository, as
    table.md shows them."""
    record = asdict(row)
    record["run"] = repo_relative(row.run) if row.run else row.run
    record["command"] = [repo_relative(arg) for arg in row.command]
    return record
