"""Run folders are never clobbered: a lock held for a run's whole life, and a guard on what the folder holds.

`fcnseg train --out DIR` and `fcnseg tune --out DIR` write results that took hours. Two mistakes
used to destroy them silently: starting a new run into a folder that holds a finished (or stopped)
one, and starting a second run into a folder while the first is still running (both exited 0,
metrics.jsonl interleaved their records, the checkpoints held only the later run). Here:

- `FolderLock`: an exclusive lock on ``DIR/.lock`` for the process's whole run, with the holder's pid,
  host and start time written inside. POSIX: ``fcntl.flock``, which the kernel releases when the
  holder dies, so a lock file left by ``kill -9`` exists but is not locked: the next run takes it
  over and says so. Elsewhere: the file is created with O_CREAT|O_EXCL, and a file whose pid (on
  this host) is dead is taken over likewise.
- `prepare_run_folder` (training) and `prepare_study_folder` (tuning): take the lock, remove a
  partly written checkpoint an interrupted write left behind, then refuse a folder that holds a run
  unless the caller resumes it or overwrites it. Overwriting removes fcnseg's own files only
  (checkpoints, metrics, plots, TensorBoard events, config.yaml; a study's database and trial
  folders), never a user's other files.
- `claim_run_folder`: the trainer's entry; under torchrun rank 0 does the above and every rank
  learns the outcome from one all-reduce, so no rank waits forever for a refused run.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fcnseg.errors import FcnsegError, UsageError
from fcnseg.training.distributed import DistributedContext, all_reduce_mean

try:
    import fcntl
except ImportError:  # Windows: the O_CREAT|O_EXCL fallback
    fcntl = None

LOCK_NAME = ".lock"
CHECKPOINTS = ("last.pt", "best.pt")
RUN_FILES = (*CHECKPOINTS, "metrics.jsonl", "metrics.json", "config.yaml", "curves.png", "confusion.png")
"""The files a training run writes in its folder (besides ``tensorboard/`` and the lock)."""
STUDY_FILES = ("study.db", "study.db-journal", "study.db-wal", "study.db-shm", "trials.json", "best.yaml",
               "best.yaml.tmp", "tune.lock")
"""The files `fcnseg tune` writes in its study folder (besides the trial_NNN run folders and the lock)."""
_TRIAL_DIR = re.compile(r"trial_\d{3,}")
_CONTENDED = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
_WHAT_TO_DO = "continue it with --resume, replace it with --overwrite, or choose another --out"


class RunFolderError(UsageError):
    """The folder holds a run that would be overwritten, is in use by another run, or cannot be used."""


class FolderLock:
    """An exclusive lock on ``folder/.lock`` held by this process until `release` (or the end of ``with``)."""

    def __init__(self, folder: str | os.PathLike, *, what: str = "run", log: Callable[[str], None] = print,
                 remove_empty_folder: bool = False) -> None:
        """Args: folder: the (existing) folder to lock; what: the kind of user named in messages; log: where
        the message about a stale lock taken over goes; remove_empty_folder: on release, remove the folder if
        nothing is left in it (a run that failed before writing anything leaves no empty folder behind)."""
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what, self.log, self.remove_empty_folder = what, log, remove_empty_folder
        self.fd: int | None = None
        self.flocked = False
        self.stale_holder: dict[str, Any] | None = None  # the dead holder this lock was taken from, if any

    def acquire(self) -> FolderLock:
        """Takes the lock, or raises `RunFolderError` naming the live holder; takes over a stale one."""
        if fcntl is None or not self._acquire_flock():
            self._acquire_exclusive_create()
        if self.stale_holder is not None:
            self.log(f"{self.folder}: taking over the lock of an earlier {self.what} "
                     f"({_holder_text(self.stale_holder)}), which is no longer running")
        return self

    def release(self) -> None:
        """Removes the lock file, then unlocks; a second call does nothing."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: a waiting process then re-checks the path (see _acquire_flock)
        if self.flocked:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if self.remove_empty_folder:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, and it stays
                self.folder.rmdir()

    def __enter__(self) -> FolderLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _acquire_flock(self) -> bool:
        """flock on the lock file; False where the file system cannot flock (then the fallback runs)."""
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in _CONTENDED:
                    raise self._busy(_read_holder(self.path)) from None
                return False
            # The holder we waited for may have unlinked the file before unlocking it: our lock is then on a
            # file nobody else will open. Only a lock on the file at the path counts.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise RunFolderError(f"cannot lock {self.path}: it keeps being replaced; is a {self.what} starting there?")
        self.fd, self.flocked = fd, True
        self.stale_holder = _parse_holder(_read_fd(fd))  # a clean release removes the file: content means a dead holder
        _write_fd(fd, _holder_record())
        return True

    def _acquire_exclusive_create(self) -> None:
        """The fallback without flock: create the file exclusively; a dead pid on this host is stale."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder and holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1))):
                    self.stale_holder = holder
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                raise self._busy(holder) from None
            self.fd = fd
            _write_fd(fd, _holder_record())
            return
        raise RunFolderError(f"cannot create {self.path}: another {self.what} keeps taking it")

    def _busy(self, holder: dict[str, Any] | None) -> RunFolderError:
        who = f" ({_holder_text(holder)})" if holder else ""
        hint = "" if fcntl is not None else f"; if no {self.what} is running there, delete {self.path}"
        return RunFolderError(f"{self.folder} is in use by another {self.what}{who}: two runs into one folder would "
                              f"mix their results; wait for it to end, or choose another --out{hint}")


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists on this machine (or may: one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_record() -> bytes:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode() + b"\n"


def _holder_text(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _parse_holder(data: bytes) -> dict[str, Any] | None:
    """The holder record in a lock file; None for an empty file, {} for one that is not a record."""
    if not data.strip():
        return None
    try:
        holder = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return _parse_holder(path.read_bytes())
    except OSError:
        return None


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_fd(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


# -- what a folder holds ---------------------------------------------------------------------------

def make_folder(out: str | os.PathLike) -> tuple[Path, bool]:
    """Creates ``out`` (and its parents), or raises `RunFolderError` for a file or an unwritable place.

    Returns:
        the folder, and whether this call created it.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder; choose a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot create the --out folder {folder}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write in the --out folder {folder}: permission denied")
    return folder, created


def run_files(folder: Path) -> list[Path]:
    """The files of a training run in ``folder``: checkpoints, metrics, plots, config.yaml, TensorBoard events."""
    found = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    tensorboard = folder / "tensorboard"
    if tensorboard.is_dir():
        found += sorted(p for p in tensorboard.iterdir() if p.name.startswith("events.out.tfevents."))
    return found


def remove_partial_checkpoints(folder: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Removes ``.last.pt.XXXX.tmp`` files that a kill during `fcnseg.runtime.atomic_write` left behind.

    Only call it holding the folder's lock: a running run's temporary file is its next checkpoint.
    """
    removed = [p for name in CHECKPOINTS for p in folder.glob(f".{name}.*.tmp") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
        log(f"{folder}: removed {path.name}, a checkpoint partly written when an earlier run was interrupted")
    return removed


def remove_run_files(folder: Path) -> list[Path]:
    """Removes a training run's own files (`run_files`) and partial checkpoints; the user's other files stay."""
    removed = run_files(folder) + [p for name in CHECKPOINTS for p in folder.glob(f".{name}.*.tmp")]
    for path in removed:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something else is in there, and it stays
        (folder / "tensorboard").rmdir()
    return removed


def describe_run(folder: Path, found: list[Path]) -> str:
    """What kind of run ``found`` (its `run_files`) make: finished, stopped, or stopped before a checkpoint."""
    names = sorted({p.name if p.parent == folder else p.parent.name + "/" for p in found})
    if (folder / "metrics.json").exists():
        kind = "a finished run"
    elif (folder / "last.pt").exists():
        kind = "a run that stopped before its end"
    else:
        kind = "the files of a run that stopped before its first checkpoint"
    return f"{kind} ({', '.join(names)})"


def prepare_run_folder(out: str | os.PathLike, *, resume: bool, overwrite: bool,
                       log: Callable[[str], None] = print) -> FolderLock:
    """Creates and locks a training run's folder, and checks it may be written; returns the held lock.

    A folder without run files (new, empty, or holding only other files) is used as it is; one that
    holds a run is continued with ``resume``, emptied of the run's files first with ``overwrite``,
    and refused otherwise.

    Raises:
        RunFolderError: (a usage error) the folder holds a run and neither ``resume`` nor ``overwrite``
            is set, both are set, another run holds the lock, or the folder cannot be created or written.
    """
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    folder, created = make_folder(out)
    lock = FolderLock(folder, what="training run", log=log, remove_empty_folder=created).acquire()
    try:
        remove_partial_checkpoints(folder, log)
        found = run_files(folder)
        if found and overwrite:
            remove_run_files(folder)
            log(f"--overwrite: removed the earlier run's {len(found)} file(s) from {folder}")
        elif found and not resume:
            raise RunFolderError(f"{folder} holds {describe_run(folder, found)}; {_WHAT_TO_DO}")
    except BaseException:
        lock.release()
        raise
    return lock


def claim_run_folder(out: str | os.PathLike, *, resume: bool, overwrite: bool, ctx: DistributedContext,
                     device: torch.device, cleanup: contextlib.ExitStack, log: Callable[[str], None] = print) -> None:
    """`prepare_run_folder` on rank 0, its lock held until ``cleanup`` closes; every rank learns the outcome.

    Under torchrun only rank 0 writes to the folder, so only it locks and checks it; one all-reduce
    then tells the other ranks whether to go on, so a refusal stops every rank with a message instead
    of leaving them waiting at the next barrier.
    """
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            cleanup.enter_context(prepare_run_folder(out, resume=resume, overwrite=overwrite, log=log))
        except Exception as err:  # re-raised below, after the other ranks heard of it
            failure = err
    if ctx.enabled and all_reduce_mean(0.0 if failure else 1.0, ctx, device) < 1.0 and failure is None:
        raise FcnsegError(f"rank 0 could not use the run folder {out} (its message says why)")
    if failure is not None:
        raise failure


def prepare_study_folder(out: str | os.PathLike, *, overwrite: bool, log: Callable[[str], None] = print) -> FolderLock:
    """Creates and locks a tuning study's folder; with ``overwrite``, removes the earlier study first.

    A folder with a study.db is continued (that is how `fcnseg tune` resumes); one with trial folders
    but no study.db (the study was deleted) is refused, since its new trials would land in old runs.

    Raises:
        RunFolderError: another search holds the lock, leftover trial folders, or an unusable folder.
    """
    folder, created = make_folder(out)
    lock = FolderLock(folder, what="fcnseg tune", log=log, remove_empty_folder=created).acquire()
    try:
        trials = sorted(p for p in folder.iterdir() if p.is_dir() and _TRIAL_DIR.fullmatch(p.name))
        if overwrite:
            removed = remove_study_files(folder, trials)
            if removed:
                log(f"--overwrite: removed the earlier study's {removed} file(s) from {folder}")
        elif trials and not (folder / "study.db").exists():
            raise RunFolderError(f"{folder} holds trial folders ({trials[0].name}, ...) but no study.db; "
                                 "replace them with --overwrite, or choose another --out")
    except BaseException:
        lock.release()
        raise
    return lock


def remove_study_files(folder: Path, trials: list[Path]) -> int:
    """Removes a study's own files and its trial folders' run files; returns how many files went."""
    removed = 0
    for name in STUDY_FILES:
        if (folder / name).is_file():
            (folder / name).unlink()
            removed += 1
    for trial in trials:
        removed += len(remove_run_files(trial))
        (trial / LOCK_NAME).unlink(missing_ok=True)  # a killed trial's; no trial runs while we hold the study's lock
        with contextlib.suppress(OSError):  # not empty: the user's files stay, and so does the folder
            trial.rmdir()
    return removed


__all__ = [
    "CHECKPOINTS", "LOCK_NAME", "RUN_FILES", "STUDY_FILES", "FolderLock", "RunFolderError", "claim_run_folder",
    "describe_run", "make_folder", "pid_alive", "prepare_run_folder", "prepare_study_folder",
    "remove_partial_checkpoints", "remove_run_files", "remove_study_files", "run_files",
]
