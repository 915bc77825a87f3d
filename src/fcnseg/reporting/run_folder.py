"""What ``fcnseg report`` reads from a run folder: its config, its history, its checkpoint, its data.

A run folder is what ``fcnseg train --out RUN`` writes: ``config.yaml`` (the resolved training
config, with the dataset and its root), ``metrics.jsonl`` (one record per epoch), ``metrics.json``
(the final validation), ``best.pt`` and ``last.pt``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcnseg.errors import DataError, UsageError
from fcnseg.runtime import read_jsonl

CHECKPOINT_NAMES = ("best.pt", "last.pt")


@dataclass
class RunFolder:
    """A training run's folder, as read for its report.

    Attributes:
        path: the folder.
        config: config.yaml as a dict (empty when absent).
        history: the records of metrics.jsonl, in order (unreadable lines skipped).
        final: metrics.json (the run's last whole validation), or None.
    """

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    final: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def checkpoint(self, given: str | os.PathLike | None = None) -> Path:
        """The checkpoint to evaluate: ``given``, else best.pt, else last.pt.

        Raises:
            UsageError: none of them exists.
        """
        if given is not None:
            path = Path(given)
            if not path.exists():
                raise UsageError(f"--checkpoint {path}: no such file")
            return path
        for name in CHECKPOINT_NAMES:
            if (self.path / name).is_file():
                return self.path / name
        raise UsageError(f"{self.path} holds no best.pt or last.pt; give the checkpoint with --checkpoint")

    def dataset_root(self, given: str | os.PathLike | None = None) -> Path:
        """The dataset's folder: ``given``, else config.yaml's root (as written, or beside the run folder).

        Raises:
            UsageError: the root is unknown or does not exist.
        """
        if given is not None:
            root = Path(given)
            if not root.is_dir():
                raise UsageError(f"--root {root}: no such folder")
            return root
        text = self.config.get("root")
        if not text:
            raise UsageError(f"{self.path / 'config.yaml'} names no dataset root; give it with --root")
        root = Path(str(text)).expanduser()
        # A relative root is relative to where training ran: usually here, or the run folder's parent.
        for candidate in (root, self.path.parent / root, self.path.parent.parent / root):
            if candidate.is_dir():
                return candidate
        raise UsageError(f"the run's dataset root {text} (from {self.path / 'config.yaml'}) is not found from here; "
                         "give it with --root")


def read_run_folder(path: str | os.PathLike) -> RunFolder:
    """Reads a run folder's config and history.

    Raises:
        UsageError: ``path`` is not a folder, or holds neither metrics.jsonl nor a checkpoint.
        DataError: config.yaml cannot be parsed.
    """
    import yaml

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"run folder {path}: no such folder (give the --out folder of fcnseg train)")
    if not (path / "metrics.jsonl").is_file() and not any((path / n).is_file() for n in CHECKPOINT_NAMES):
        raise UsageError(f"{path} is not a run folder: it holds no metrics.jsonl, best.pt or last.pt")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise DataError(f"{path / 'config.yaml'}: not valid YAML ({err})") from None
        config = loaded if isinstance(loaded, dict) else {}
    final = None
    if (path / "metrics.json").is_file():
        try:
            final = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        except ValueError:
            final = None
    return RunFolder(path, config, read_jsonl(path / "metrics.jsonl"), final if isinstance(final, dict) else None)
