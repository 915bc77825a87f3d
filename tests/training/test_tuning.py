"""`fcnseg tune` on tiny synthetic data: a stored study that resumes, best.yaml, refusals, interrupted trials."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fcnseg.cli import main
from fcnseg.training.config import resolve_config

optuna = pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from fcnseg.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("scenes") / "data", num_classes=2, n=5, size=(48, 64), seed=0,
                          progress=False)


def tune_args(root: Path, out: Path, trials: int, *extra: str) -> list[str]:
    return ["tune", "--dataset", "folder", "--root", str(root), "--model", "fcn_resnet18", "--weights-backbone", "none",
            "--trials", str(trials), "--out", str(out), "--iterations-per-trial", "2", "--batch-sizes", "2", "4",
            "--crops", "48x64", "--channels-last", "false", "--amp", "none", "--workers", "0", "--no-progress", *extra]


def load_study(out: Path):
    from fcnseg.training.tuning import STUDY_NAME

    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


def test_study_is_stored_resumed_and_gives_a_usable_best_yaml(scenes, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(tune_args(scenes, out, 2)) == 0
    assert (out / "study.db").exists()
    assert len(load_study(out).trials) == 2
    for number in (0, 1):
        assert (out / f"trial_{number:03d}" / "metrics.json").exists()

    # Re-running with a larger budget continues the same study: one more trial, not three.
    assert main(tune_args(scenes, out, 3)) == 0
    study = load_study(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert (out / "trial_002" / "metrics.json").exists()
    printed = capsys.readouterr().out
    assert "2 finished trial(s), running 1 more" in printed and "best: trial" in printed

    # Already complete: nothing runs.
    assert main(tune_args(scenes, out, 3)) == 0
    assert len(load_study(out).trials) == 3

    records = json.loads((out / "trials.json").read_text())
    assert [r["state"] for r in records] == ["complete"] * 3
    best = max(records, key=lambda r: r["miou"])
    config = resolve_config({}, str(out / "best.yaml"))
    assert config.lr == pytest.approx(best["params"]["lr"])
    assert config.weight_decay == pytest.approx(best["params"]["weight_decay"])
    assert config.batch_size == best["params"]["batch_size"] and config.crop == (48, 64)
    assert config.schedule == best["params"]["schedule"]
    # The recipe keeps the training options' budget, not the trial budget, and no run folder.
    assert config.iterations is None and config.epochs == 30 and config.out == "runs/train"
    assert config.model == "fcn_resnet18" and config.weights_backbone is None and config.dataset == "folder"

    # Another budget in the same folder is refused with a one-line error.
    changed = tune_args(scenes, out, 4)
    changed[changed.index("--iterations-per-trial") + 1] = "3"
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "iterations" in err and "Traceback" not in err


def test_an_interrupted_trial_resumes_and_fixed_options_are_not_searched(scenes, tmp_path):
    out = tmp_path / "tune"
    args = tune_args(scenes, out, 1, "--lr", "0.02")
    assert main(args) == 0
    # A trial left RUNNING after drawing its recipe, as by a killed process.
    from fcnseg.training.tuning import SearchSpace

    study = load_study(out)
    study.enqueue_trial({"weight_decay": 1e-4, "batch_size": 2, "crop": "48x64", "schedule": "poly"})
    killed = study.ask()
    SearchSpace(lr=None, batch_size=(2, 4), crop=((48, 64),)).suggest(killed)
    assert killed.number == 1 and killed.params["batch_size"] == 2
    assert main(tune_args(scenes, out, 2, "--lr", "0.02")) == 0
    trials = load_study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    retry = trials[2]
    assert retry.user_attrs["resume_of"] == 1 and retry.params == trials[1].params
    assert (out / "trial_001" / "metrics.json").exists() and not (out / "trial_002").exists()
    assert all("lr" not in t.params for t in trials)
    assert resolve_config({}, str(out / "trial_001" / "config.yaml")).lr == 0.02


def test_search_space_draws_config_values():
    from fcnseg.training.tuning import SearchSpace

    space = SearchSpace(lr=None, crop=((32, 48), (64, 96)))
    params = space.suggest(optuna.trial.FixedTrial(
        {"weight_decay": 1e-4, "batch_size": 8, "crop": "64x96", "schedule": "cosine"}))
    assert params == {"weight_decay": 1e-4, "batch_size": 8, "crop": (64, 96), "schedule": "cosine"}
    assert "lr" not in space.describe() and space.describe()["crop"] == {"choices": ["32x48", "64x96"]}


def test_without_optuna_the_error_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` fail
    assert main(["tune", "--dataset", "folder", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fcnseg[tune]'" in err and "Traceback" not in err


def test_on_epoch_end_sees_each_epoch_and_can_stop_the_run(scenes, tmp_path):
    from fcnseg.training.trainer import train

    config = resolve_config({
        "dataset": "folder", "root": str(scenes), "model": "fcn_resnet18", "weights_backbone": "none",
        "crop": (48, 64), "batch_size": 4, "epochs": 3, "workers": 0, "amp": "none", "channels_last": False,
        "out": str(tmp_path / "run"),
    })
    seen = []

    class Stop(Exception):
        pass

    def on_epoch_end(record):
        seen.append(record)
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(config, progress=False, on_epoch_end=on_epoch_end)
    assert [r["epoch"] for r in seen] == [1, 2] and all("miou" in r for r in seen)
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_a_recipe_that_cannot_run_fails_its_trial_not_the_search(scenes, tmp_path, capsys):
    # Batch 8 is more than the 4 training images: the trial fails, is recorded and counts as done.
    args = tune_args(scenes, tmp_path / "tune", 1)
    args[args.index("--batch-sizes") + 1: args.index("--batch-sizes") + 3] = ["8"]
    assert main(args) == 1
    assert "no trial of" in capsys.readouterr().out
    records = json.loads((tmp_path / "tune" / "trials.json").read_text())
    assert [r["state"] for r in records] == ["fail"] and "lower --batch-size" in records[0]["error"]
    assert main(args) == 1 and len(load_study(tmp_path / "tune").trials) == 1  # not retried


def test_a_running_search_is_refused_a_stale_lock_taken_over_and_overwrite_starts_anew(scenes, tmp_path, capsys):
    from fcnseg.training.run_dir import FolderLock
    from tests.training.test_run_dir import leave_stale_lock

    out = tmp_path / "tune"
    out.mkdir()
    with FolderLock(out, what="fcnseg tune"):  # a search running in the folder
        assert main(tune_args(scenes, out, 1)) == 2
    err = capsys.readouterr().err
    assert "in use by another fcnseg tune" in err and "Traceback" not in err
    assert not (out / "study.db").exists()

    dead = leave_stale_lock(out)  # a search killed by kill -9
    assert main(tune_args(scenes, out, 1)) == 0
    assert f"taking over the lock of an earlier fcnseg tune (pid {dead}" in capsys.readouterr().out
    assert not (out / ".lock").exists() and len(load_study(out).trials) == 1

    # Another budget is refused without --overwrite; with it, the old study goes and a new one starts.
    (out / "notes.txt").write_text("mine")
    changed = tune_args(scenes, out, 1)
    changed[changed.index("--iterations-per-trial") + 1] = "3"
    assert main(changed) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*changed, "--overwrite"]) == 0
    assert "--overwrite: removed the earlier study's" in capsys.readouterr().out
    study = load_study(out)
    assert len(study.trials) == 1 and study.user_attrs["trial_config"]["iterations"] == 3
    assert (out / "notes.txt").read_text() == "mine" and (out / "trial_000" / "metrics.json").exists()


@pytest.mark.parametrize("groups", [(), ("--holdout-groups", r"\d$")])  # runs of images, or whole groups
def test_a_holdout_scores_trials_without_reading_val_and_best_yaml_trains_on_all_of_train(scenes, tmp_path, capsys,
                                                                                          groups):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(scenes, root)
    (root / "val.txt").write_text("no_such_image\n")  # any read of the val split would fail the trial
    out = tmp_path / "tune"
    assert main(tune_args(root, out, 2, "--holdout", "0.4", *groups)) == 0
    printed = capsys.readouterr().out
    whole = ", whole groups of '\\\\d$'" if groups else ""  # repr doubles the backslash
    assert "validating on 2 images held out of the training split" in printed
    assert "best: trial" in printed and f"holdout (0.4 of train{whole}) mIoU" in printed
    records = json.loads((out / "trials.json").read_text())
    assert [r["state"] for r in records] == ["complete"] * 2
    for number in (0, 1):
        trial_config = resolve_config({}, str(out / f"trial_{number:03d}" / "config.yaml"))
        assert trial_config.holdout == pytest.approx(0.4)
    text = (out / "best.yaml").read_text()
    assert f"holdout (0.4 of 'train'{whole}, not trained on) mIoU" in text
    best = resolve_config({}, str(out / "best.yaml"))
    assert best.holdout == 0.0 and best.holdout_groups == ""
