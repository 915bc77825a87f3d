"""Where the experiments find things, and how the documents they write name them.

The runs read the shared data (CamVid, the MobileNetV2 weights) from ``../shared/data`` beside the
repository or ``$FCNSEG_SHARED_DATA``, by absolute path. The tables, docs/RESULTS.md and the logs
show every command with paths relative to the repository root instead (``--root
../shared/data/camvid``): a reader runs them from a clone of their own, where this machine's
absolute paths mean nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "FCNSEG_SHARED_DATA"
# The shared data as the documents name it: beside the repository, where the README puts it.
DOCUMENTED_SHARED_DATA = Path("..", "shared", "data")


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or $FCNSEG_SHARED_DATA (as the tests find it)."""
    return Path(os.environ.get(SHARED_DATA_ENV, REPO.parent / "shared" / "data"))


def repo_relative(arg: str, repo: Path = REPO, shared: Path | None = None) -> str:
    """One command-line argument as a document shows it.

    An absolute path in the shared data becomes ``../shared/data/...`` (wherever the data sits on
    this machine); one in the repository, or in a folder beside it, becomes relative to the
    repository root. Any other argument, an option, a number or a path elsewhere (the user's
    choice), is returned unchanged.
    """
    if not os.path.isabs(arg):
        return arg
    path = Path(arg).resolve()
    shared = (shared if shared is not None else shared_data_dir()).resolve()
    if path.is_relative_to(shared):
        return (DOCUMENTED_SHARED_DATA / path.relative_to(shared)).as_posix()
    repo = repo.resolve()
    # Beside the repository only when that is not the file system's root (then every path would be).
    for base in (repo, repo.parent) if repo.parent != Path(repo.anchor) else (repo,):
        if path.is_relative_to(base):
            return Path(os.path.relpath(path, repo)).as_posix()
    return arg


def command_text(command: list[str], repo: Path = REPO, shared: Path | None = None) -> str:
    """``fcnseg ARGS`` as the tables, logs and dry runs print it: paths relative to the repository."""
    return " ".join(["fcnseg", *(repo_relative(arg, repo, shared) for arg in command)])
