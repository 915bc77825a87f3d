"""Runs `fcnseg` commands for the experiment tables: resumable, checked, logged.

Every run goes through the public command line, either as ``python -m fcnseg ...`` in a subprocess
(the default) or through ``fcnseg.cli.main`` in this process (the console script's own entry point;
it saves the few seconds of start-up per command that dominate the quick checks).

A training run lives in ``OUT/runs/NAME``. It is skipped when its ``metrics.json`` exists (fcnseg
train writes it only when a run ends), continued with ``--resume`` when only its ``last.pt`` exists,
and refused when ``experiment.json`` shows it was started with another command (so that quick and
full settings, or two versions of a table, never mix). With ``records``, a finished run's light files
(`RECORD_FILES`, no checkpoint) are also kept in ``records/NAME``, which lives in the repository: a
checkout without ``OUT`` (runs/ is not in git) then finds the run there instead of training it again.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from repo_paths import command_text

RECORD_FILES = ("experiment.json", "config.yaml", "metrics.jsonl", "metrics.json")  # what a run record keeps


class ExperimentError(RuntimeError):
    """A run failed or its folder holds another experiment."""


@dataclass
class TrainRun:
    """A finished training run: its folder, final val metrics and training time."""

    name: str
    run_dir: Path
    command: list[str]
    metrics: dict[str, Any]
    train_seconds: float | None
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "last.pt"


@dataclass
class EvalRun:
    """A finished `fcnseg eval`: its JSON report (metrics, mode, flip, seconds)."""

    name: str
    path: Path
    command: list[str]
    report: dict[str, Any]


class Runner:
    """Launches fcnseg commands under ``out`` and collects their results.

    Args:
        out: the experiments folder (runs go to ``out/runs``).
        launcher: "subprocess" (``sys.executable -m fcnseg``) or "inprocess" (``fcnseg.cli.main``).
        dry_run: print the commands instead of running them (results are then not available).
        log: where progress lines go.
        records: where finished training runs are kept without their checkpoints (None: nowhere).
    """

    def __init__(self, out: str | Path, *, launcher: str = "subprocess", dry_run: bool = False,
                 log: Callable[[str], None] = print, records: str | Path | None = None) -> None:
        if launcher not in ("subprocess", "inprocess"):
            raise ValueError(f"launcher must be subprocess or inprocess, not {launcher!r}")
        self.out = Path(out)
        self.launcher = launcher
        self.dry_run = dry_run
        self.log = log
        self.records = Path(records) if records is not None else None
        self.commands: list[list[str]] = []  # in the order they were (or would have been) run

    # -- training -----------------------------------------------------------------------------
    def train(self, name: str, args: list[str], *, inputs: dict[str, str | Path] | None = None) -> TrainRun | None:
        """Runs ``fcnseg train ARGS --out OUT/runs/NAME`` unless it already finished.

        Args:
            inputs: files the run reads besides the dataset (e.g. a tuned config); their hashes
                are part of what must match for an existing run to be reused.
        """
        run_dir = self.out / "runs" / name
        command = ["train", *args, "--out", str(run_dir)]
        self.commands.append(command)
        # The spec keeps the command as run (absolute paths included): it identifies the run folder, and
        # one made before the documents showed relative paths must still match.
        spec = {"command": command, "inputs": {k: _sha256(Path(v)) for k, v in (inputs or {}).items()}}
        if self.dry_run:
            self.log(command_text(command))
            return None
        self._restore(name, run_dir, spec)
        self._check_spec(run_dir / "experiment.json", spec)
        if not (run_dir / "metrics.json").exists():
            argv = list(command)
            if (run_dir / "last.pt").exists():
                argv.append("--resume")
                self.log(f"[{name}] resuming an interrupted run")
            else:
                # Epoch lines of an attempt killed before its first checkpoint would be repeated.
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
                self.log(f"[{name}] training")
            self._launch(argv, run_dir / "train.log")
            if not (run_dir / "metrics.json").exists():
                raise ExperimentError(f"fcnseg train ended without writing {run_dir / 'metrics.json'}")
        else:
            self.log(f"[{name}] done before: {run_dir / 'metrics.json'}")
        self._keep(name, run_dir)
        return load_train_run(name, run_dir, command)

    def _restore(self, name: str, run_dir: Path, spec: dict[str, Any]) -> None:
        """Copies the record of a finished run into ``run_dir`` when the run is not there (a new
        checkout) and the record was made by the same command."""
        record = self.records / name if self.records is not None else None
        if record is None or (run_dir / "metrics.json").exists() or not (record / "metrics.json").exists():
            return
        if json.loads((record / "experiment.json").read_text()) != spec:
            self.log(f"[{name}] the record {record} is of another command or input: not used")
            return
        for file in sorted(record.rglob("*")):  # the run's files, then its evaluations' (eval/)
            if file.is_file():
                target = run_dir / file.relative_to(record)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())
        self.log(f"[{name}] finished in an earlier checkout: restored from the record {record} (no checkpoint)")

    def _keep_file(self, path: Path) -> None:
        """Adds a file of a run's folder (an evaluation's report) to the run's record, if it has one."""
        runs = self.out / "runs"
        if self.records is None or not path.is_relative_to(runs):
            return
        relative = path.relative_to(runs)
        target = self.records / relative
        if (self.records / relative.parts[0] / "metrics.json").exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())

    def _keep(self, name: str, run_dir: Path) -> None:
        """Writes the record of a finished run (`RECORD_FILES`) unless it exists."""
        if self.records is None or (self.records / name / "metrics.json").exists():
            return
        record = self.records / name
        record.mkdir(parents=True, exist_ok=True)
        for file in RECORD_FILES:  # metrics.json last: a record is complete once it exists
            (record / file).write_bytes((run_dir / file).read_bytes())

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, name: str, checkpoint: Path, args: list[str], out_json: Path) -> EvalRun | None:
        """Runs ``fcnseg eval CHECKPOINT ARGS --out OUT_JSON`` unless the report exists."""
        command = ["eval", str(checkpoint), *args, "--out", str(out_json)]
        self.commands.append(command)
        if self.dry_run:
            self.log(command_text(command))
            return None
        if out_json.exists() and not checkpoint.exists():  # restored from a record, checked when it was made
            self.log(f"[{name}] done in an earlier checkout: {out_json}")
            return EvalRun(name, out_json, command, json.loads(out_json.read_text()))
        spec = {"command": command, "inputs": {"checkpoint": _sha256(checkpoint)}}
        self._check_spec(out_json.with_suffix(".experiment.json"), spec)
        if not out_json.exists():
            self.log(f"[{name}] evaluating")
            self._launch(command, out_json.with_suffix(".log"))
        else:
            self.log(f"[{name}] done before: {out_json}")
        self._keep_file(out_json.with_suffix(".experiment.json"))
        self._keep_file(out_json)
        return EvalRun(name, out_json, command, json.loads(out_json.read_text()))

    # -- tuning -------------------------------------------------------------------------------
    def tune(self, args: list[str], study_dir: Path) -> Path | None:
        """Runs ``fcnseg tune ARGS --out STUDY_DIR``; the study resumes and checks itself, so this
        always launches (a finished study returns at once). Returns the path of best.yaml."""
        command = ["tune", *args, "--out", str(study_dir)]
        self.commands.append(command)
        if self.dry_run:
            self.log(command_text(command))
            return None
        self.log(f"[tune] {study_dir}")
        self._launch(command, study_dir / "tune.log")
        return study_dir / "best.yaml"

    # -- machinery ----------------------------------------------------------------------------
    def _check_spec(self, path: Path, spec: dict[str, Any]) -> None:
        if path.exists():
            old = json.loads(path.read_text())
            if old != spec:
                raise ExperimentError(
                    f"{path.parent} holds a run of another command or input:\n  was: {_describe(old)}\n"
                    f"  now: {_describe(spec)}\nuse another --out, or delete {path.parent} to redo it")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec, indent=2))

    def _launch(self, argv: list[str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tic = time.perf_counter()
        with open(log_path, "a") as log_file:
            log_file.write(f"$ {command_text(argv)}\n")
            log_file.flush()
            if self.launcher == "subprocess":
                status = _run_subprocess(argv, log_file)
            else:
                status = _run_inprocess(argv, log_file)
        if status != 0:
            raise ExperimentError(f"fcnseg {argv[0]} exited with status {status}; see {log_path}")
        self.log(f"  finished in {time.perf_counter() - tic:.0f} s (log {log_path})")


def _run_subprocess(argv: list[str], log_file: TextIO) -> int:
    process = subprocess.Popen([sys.executable, "-m", "fcnseg", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert process.stdout is not None
    for line in process.stdout:
        log_file.write(line)
        sys.stdout.write(line)
    return process.wait()


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _run_inprocess(argv: list[str], log_file: TextIO) -> int:
    from fcnseg.cli import main

    tee = _Tee(log_file, sys.__stdout__ if sys.stdout is None else sys.stdout)
    with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
        try:
            return main(argv)
        except SystemExit as exit_:  # argparse usage errors
            return int(exit_.code or 0)


def load_train_run(name: str, run_dir: Path, command: list[str] | None = None) -> TrainRun:
    """Reads a finished run's metrics.json, metrics.jsonl and config.yaml."""
    import yaml

    metrics = json.loads((run_dir / "metrics.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    seconds = float(records[-1]["time_s"]) if records and "time_s" in records[-1] else None
    return TrainRun(name, run_dir, command or [], metrics, seconds, config, records)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _describe(spec: dict[str, Any]) -> str:
    text = "fcnseg " + " ".join(spec.get("command", []))
    if spec.get("inputs"):
        text += "  (inputs " + ", ".join(f"{k} {v}" for k, v in spec["inputs"].items()) + ")"
    return text
