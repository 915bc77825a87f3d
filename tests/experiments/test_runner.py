"""experiments/runner.py's run records: a finished run is kept without its checkpoint and found again
by a checkout that lacks the run's folder; a record of another command is not used."""
from __future__ import annotations

import hashlib
import json
import sys

from tests.conftest import REPO_ROOT  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
from runner import RECORD_FILES, Runner  # noqa: E402


def finished_run(run_dir, command):
    run_dir.mkdir(parents=True)
    (run_dir / "experiment.json").write_text(json.dumps({"command": command, "inputs": {}}, indent=2))
    (run_dir / "config.yaml").write_text("lr: 0.02\nseed: 1\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "time_s": 12.5}) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps({"miou": 0.61}))
    (run_dir / "last.pt").write_bytes(b"checkpoint")


def test_a_finished_run_is_kept_and_restored_in_a_new_checkout(tmp_path, monkeypatch):
    records, lines = tmp_path / "records", []
    args = ["--lr", "0.02"]
    old = Runner(tmp_path / "old", records=records, log=lines.append)
    finished_run(old.out / "runs" / "r", ["train", *args, "--out", str(old.out / "runs" / "r")])
    run = old.train("r", args)  # done before: its record is written
    assert run.metrics == {"miou": 0.61}
    assert sorted(p.name for p in (records / "r").iterdir()) == sorted(RECORD_FILES)  # no checkpoint
    # An evaluation of the run, done before: its report joins the record.
    report = run.run_dir / "eval" / "holdout.json"
    eval_command = ["eval", str(run.checkpoint), "--split", "train", "--out", str(report)]
    spec = {"command": eval_command, "inputs": {"checkpoint": hashlib.sha256(b"checkpoint").hexdigest()[:16]}}
    report.parent.mkdir()
    report.with_suffix(".experiment.json").write_text(json.dumps(spec, indent=2))
    report.write_text(json.dumps({"miou": 0.6}))
    assert old.evaluate("e", run.checkpoint, ["--split", "train"], report).report == {"miou": 0.6}
    assert sorted(p.name for p in (records / "r" / "eval").iterdir()) == ["holdout.experiment.json", "holdout.json"]

    launched = []
    monkeypatch.setattr(Runner, "_launch", lambda self, argv, log_path: launched.append(argv))
    # A new checkout with the same out folder: the run is restored, not trained.
    (old.out / "runs" / "r").rename(tmp_path / "gone")
    new = Runner(tmp_path / "old", records=records, log=lines.append)
    again = new.train("r", args)
    assert launched == [] and any("restored from the record" in line for line in lines)
    assert (again.metrics, again.train_seconds, again.config) == ({"miou": 0.61}, 12.5, {"lr": 0.02, "seed": 1})
    assert not again.checkpoint.exists()
    assert new.evaluate("e", again.checkpoint, ["--split", "train"], report).report == {"miou": 0.6}
    assert launched == []

    # Another command under the same name: the record is not used, the run is trained.
    other = Runner(tmp_path / "other", records=records, log=lines.append)
    try:
        other.train("r", ["--lr", "0.05"])
    except Exception:  # the fake launch writes no metrics.json
        pass
    assert len(launched) == 1 and "--lr 0.05" in " ".join(launched[0])
    assert any("is of another command or input: not used" in line for line in lines)
    assert json.loads((records / "r" / "metrics.json").read_text()) == {"miou": 0.61}  # left as it was


def test_no_records_by_default(tmp_path):
    runner = Runner(tmp_path / "x")
    finished_run(runner.out / "runs" / "r", ["train", "--out", str(runner.out / "runs" / "r")])
    assert runner.train("r", []).metrics["miou"] == 0.61 and runner.records is None
