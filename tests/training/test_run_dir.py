"""Run folders are never clobbered: the folder lock (flock and its O_EXCL fallback), stale locks left by
kill -9, the guard on a folder that holds a run, --overwrite's removals, partial checkpoints, and the
refusals through `fcnseg.cli.main` (exit status 2)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fcnseg.cli import main
from fcnseg.training import run_dir
from fcnseg.training.run_dir import FolderLock, RunFolderError, prepare_run_folder, prepare_study_folder

# Takes the lock as a run would, then dies by SIGKILL: the lock file stays, holding the dead pid.
_KILLED_HOLDER = """
import os, signal, sys
from fcnseg.training.run_dir import FolderLock
FolderLock(sys.argv[1]).acquire()
os.kill(os.getpid(), signal.SIGKILL)
"""


def leave_stale_lock(folder: Path) -> int:
    """Leaves ``folder/.lock`` as a run killed by kill -9 does; returns the dead holder's pid."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_HOLDER, str(folder)], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    holder = json.loads((folder / ".lock").read_text())
    assert holder["pid"] == proc.pid
    return proc.pid


def fake_run(folder: Path, *, finished: bool = True) -> None:
    """The files a run leaves (contents do not matter to the guard)."""
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "curves.png"):
        (folder / name).write_bytes(b"x")
    if finished:
        (folder / "metrics.json").write_text("{}")


def test_a_held_lock_refuses_a_second_holder_and_release_removes_it(tmp_path):
    with FolderLock(tmp_path, what="training run") as lock:
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with pytest.raises(RunFolderError, match=rf"in use by another training run \(pid {os.getpid()} on"):
            FolderLock(tmp_path, what="training run").acquire()
        assert lock.stale_holder is None
    assert not (tmp_path / ".lock").exists()
    FolderLock(tmp_path).acquire().release()  # free again, and no stale-lock message: it was released cleanly


def test_a_lock_left_by_kill_9_is_taken_over_with_a_message(tmp_path):
    pid = leave_stale_lock(tmp_path)
    messages: list[str] = []
    with FolderLock(tmp_path, what="training run", log=messages.append) as lock:
        assert lock.stale_holder["pid"] == pid
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and f"pid {pid}" in messages[0] and "no longer running" in messages[0]


def test_without_fcntl_the_exclusive_create_fallback_refuses_and_takes_over_dead_pids(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "fcntl", None)
    messages: list[str] = []
    with FolderLock(tmp_path, log=messages.append):
        with pytest.raises(RunFolderError, match="in use by another run .*delete"):
            FolderLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists() and not messages
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "then"}))
    with FolderLock(tmp_path, log=messages.append):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and f"pid {dead_pid}" in messages[0]
    # A holder on another host cannot be checked: refused, with how to clear it.
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunFolderError, match="elsewhere"):
        FolderLock(tmp_path).acquire()


def test_pid_alive():
    assert run_dir.pid_alive(os.getpid()) and not run_dir.pid_alive(0)


def test_a_folder_with_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    fake_run(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError) as refused:
        prepare_run_folder(out, resume=False, overwrite=False, log=print)
    message = str(refused.value)
    assert "holds a finished run" in message and "--resume" in message and "--overwrite" in message
    assert "another --out" in message and not (out / ".lock").exists()
    prepare_run_folder(out, resume=True, overwrite=False).release()
    assert (out / "last.pt").exists()
    messages: list[str] = []
    prepare_run_folder(out, resume=False, overwrite=True, log=messages.append).release()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # fcnseg's files went, the user's stayed
    assert "--overwrite: removed the earlier run's 7 file(s)" in messages[0]
    with pytest.raises(RunFolderError, match="give one of them"):
        prepare_run_folder(out, resume=True, overwrite=True)


def test_a_stopped_run_and_unrelated_files(tmp_path):
    out = tmp_path / "run"
    fake_run(out, finished=False)
    with pytest.raises(RunFolderError, match="holds a run that stopped before its end"):
        prepare_run_folder(out, resume=False, overwrite=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.txt").write_text("a user's folder")
    prepare_run_folder(other, resume=False, overwrite=False).release()  # nothing of a run: fine to use
    assert (other / "README.txt").exists()


def test_a_partial_checkpoint_is_removed_by_the_next_run(tmp_path):
    (tmp_path / ".last.pt.k2j4h1.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".notes.tmp").write_text("not ours")
    messages: list[str] = []
    prepare_run_folder(tmp_path, resume=True, overwrite=False, log=messages.append).release()
    assert not (tmp_path / ".last.pt.k2j4h1.tmp").exists() and (tmp_path / ".notes.tmp").exists()
    assert len(messages) == 1 and ".last.pt.k2j4h1.tmp" in messages[0] and "partly written" in messages[0]


def test_an_unusable_out_is_refused_and_a_new_folder_left_empty_is_removed(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        prepare_run_folder(tmp_path / "file", resume=False, overwrite=False)
    with pytest.raises(RunFolderError, match="cannot create"):
        prepare_run_folder(tmp_path / "file" / "run", resume=False, overwrite=False)
    prepare_run_folder(tmp_path / "new", resume=False, overwrite=False).release()
    assert not (tmp_path / "new").exists()  # a run that wrote nothing leaves no empty folder


def test_a_study_folder_continues_or_is_replaced_and_leftover_trials_are_refused(tmp_path):
    out = tmp_path / "tune"
    fake_run(out / "trial_000")
    (out / "trial_000" / "mine.txt").write_text("kept")
    fake_run(out / "trial_001")
    with pytest.raises(RunFolderError, match="trial folders .* but no study.db"):
        prepare_study_folder(out, overwrite=False)
    (out / "study.db").write_bytes(b"")
    prepare_study_folder(out, overwrite=False).release()  # a study there: continued
    (out / "best.yaml").write_text("lr: 0.1\n")
    (out / "notes.txt").write_text("mine")
    messages: list[str] = []
    prepare_study_folder(out, overwrite=True, log=messages.append).release()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "trial_000"]
    assert [p.name for p in (out / "trial_000").iterdir()] == ["mine.txt"]
    assert "removed the earlier study's" in messages[0]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from fcnseg.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("scenes") / "data", num_classes=2, n=4, size=(48, 64), seed=0,
                          progress=False)


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "folder", "--root", str(root), "--model", "fcn_resnet18", "--weights-backbone", "none",
            "--crop", "48x64", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--out", str(out),
            "--no-progress", "--amp", "none", *extra]


def test_fcnseg_train_refuses_a_folder_with_a_run_or_in_use_with_exit_status_2(scenes, tmp_path, capsys):
    out = tmp_path / "run"
    fake_run(out)
    assert main(train_args(scenes, out)) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    busy = tmp_path / "busy"
    busy.mkdir()
    with FolderLock(busy, what="training run"):
        assert main(train_args(scenes, busy)) == 2
        err = capsys.readouterr().err
        assert "in use by another training run" in err and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in busy.iterdir()) == []  # the refused run wrote nothing
