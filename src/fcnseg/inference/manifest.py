"""``manifest.jsonl``: what each input of a bulk prediction became, the record a rerun resumes from.

One JSON record per line: ``{"input", "outputs", "size", "status", "error", "bytes"}``: the input's
absolute path (or the text given, for a path or pattern that names nothing), its output files
relative to the folder, the image's ``[height, width]`` (None for a video or a failure), ``"ok"``,
``"failed"`` or ``"pending"``, the reason of a failure, and the size in bytes of each output file.

How a run uses it, so that a kill (even ``kill -9``) loses at most the inputs in flight:

1. `Manifest` reads the folder's manifest and the parts a killed multi-process run left behind
   (``manifest.rank-K.jsonl``); the last record of an input wins.
2. `Manifest.start` rewrites ``manifest.jsonl`` with the earlier records this run keeps and one
   ``"pending"`` record for each input it is about to predict: the files of a killed run are then
   known as that input's, and a rerun replaces them without ``--overwrite``.
3. Each finished input appends its ``"ok"`` or ``"failed"`` record (`Manifest.add`, flushed), to
   ``manifest.jsonl``, or under torchrun to its rank's part. Outputs are written under a temporary
   name and renamed before the record, so a record never names a half-written file.
4. `Manifest.finish` merges the parts and compacts the file to one record per input.

An input counts as done (`Manifest.done`) only if its last record says ``"ok"`` and every output it
names exists with the recorded size in bytes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from fcnseg.errors import FcnsegError
from fcnseg.runtime import read_jsonl

NAME = "manifest.jsonl"
PART_PATTERN = "manifest.rank-*.jsonl"


def part_name(rank: int) -> str:
    """The file a rank of a multi-process run appends its records to."""
    return f"manifest.rank-{rank}.jsonl"


def make_record(source: str, outputs: list[str], size: tuple[int, int] | None, error: str | None, *,
                folder: Path | None = None, status: str | None = None) -> dict[str, Any]:
    """The record of one input; with ``folder``, the byte size of each output (which must exist)."""
    sizes = [output_size(folder / name) for name in outputs] if folder is not None else None
    return {"input": source, "outputs": list(outputs), "size": list(size) if size else None,
            "status": status or ("failed" if error else "ok"), "error": error, "bytes": sizes}


def output_size(path: Path) -> int:
    """The bytes of an output: a file's size, or the total of the files in a folder of outputs (a
    video's frame masks).

    Raises:
        OSError: ``path`` does not exist.
    """
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one manifest file; a line cut short by a kill is skipped (its files then count
    as no input's)."""
    return [record for record in read_jsonl(path) if isinstance(record.get("input"), str)]


class Manifest:
    """The manifest of an output folder, as earlier runs left it, and this run's writer of it.

    Args:
        folder: the output folder (need not exist yet).
        rank, world_size: this process's place in a torchrun job; with several processes each
            appends to its own part (``manifest.rank-K.jsonl``), which `finish` merges.
    """

    def __init__(self, folder: str | os.PathLike, *, rank: int = 0, world_size: int = 1) -> None:
        self.folder = Path(folder)
        self.path = self.folder / NAME
        self.part = self.path if world_size == 1 else self.folder / part_name(rank)
        self.latest = self._read_all()
        self._owners = {name: source for source, r in self.latest.items() for name in r.get("outputs") or []}

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob(PART_PATTERN)) if self.folder.is_dir() else []

    def _read_all(self) -> dict[str, dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for path in (self.path, *self._parts()):
            for record in read_records(path):
                latest[record["input"]] = record  # the last record, at the place of the first
        return latest

    def owner(self, name: str) -> str | None:
        """The input whose output ``name`` is, according to the earlier runs; None if unlisted."""
        return self._owners.get(name)

    def done(self, source: str) -> bool:
        """Whether ``source`` was predicted: its last record is "ok" and each of its outputs exists
        with the size recorded (a file cut short or replaced since does not count)."""
        record = self.latest.get(source)
        if not record or record.get("status") != "ok" or not record.get("outputs"):
            return False
        sizes = record.get("bytes") or [None] * len(record["outputs"])
        for name, expected in zip(record["outputs"], sizes):
            try:
                actual = output_size(self.folder / name)
            except OSError:
                return False
            if actual != expected and not (expected is None and actual > 0):
                return False
        return True

    def start(self, keep: Iterable[dict[str, Any]], *, replacing: set[str], outputs: set[str]) -> None:
        """Rewrites the manifest (atomically) for a run: the earlier records it neither repeats nor
        overwrites, then ``keep`` (this run's records known at its start: skipped inputs, inputs that
        name nothing, and "pending" ones). Parts of an earlier killed run are folded in and removed."""
        kept = [r for source, r in self.latest.items()
                if source not in replacing and not outputs.intersection(r.get("outputs") or [])]
        self._rewrite([*kept, *keep])
        for part in self._parts():
            part.unlink(missing_ok=True)

    def add(self, record: dict[str, Any]) -> None:
        """Appends one finished input's record and flushes it to the file.

        Raises:
            FcnsegError: the manifest cannot be written (a full disk, permissions changed mid-run): the
                run stops, since outputs it could not record would not count as done.
        """
        try:
            with self.part.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
                stream.flush()
        except OSError as err:
            raise FcnsegError(f"cannot append to {self.part} ({err.strerror or err}); stopping: a rerun resumes "
                              "from the inputs it recorded") from None

    def finish(self) -> list[dict[str, Any]]:
        """Merges the parts into ``manifest.jsonl``, one record per input (the last), and returns them."""
        records = list(self._read_all().values())
        self._rewrite(records)
        for part in self._parts():
            part.unlink(missing_ok=True)
        return records

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.folder / f".{NAME}.{os.getpid()}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)
