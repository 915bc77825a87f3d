"""Split list files: one entry per line, shared by the VOC, CamVid and folder readers."""
from __future__ import annotations

import os
from pathlib import Path

from fcnseg.errors import DataError


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Returns the non-blank lines of a split file, stripped; lines starting with ``#`` are comments.

    Raises:
        DataError: the file is missing, unreadable, or lists nothing.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read split file {path}: {err}") from None
    lines = [line.strip() for line in text.splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    if not entries:
        raise DataError(f"split file {path} is empty")
    return entries
