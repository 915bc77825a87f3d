"""Training end to end on tiny synthetic data: learning, exact resume after SIGKILL, refusals, DDP,
the user's own datasets and transforms, callbacks."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcnseg.cli import main
from fcnseg.errors import CheckpointError, FcnsegError
from fcnseg.models.checkpoint import load_checkpoint
from fcnseg.training import Callback
from fcnseg.training.config import resolve_config
from fcnseg.training.trainer import train
from tests.training.helpers import Recorder, Squares, user_config


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory) -> Path:
    from fcnseg.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("scenes") / "data", num_classes=3, n=20, size=(64, 80), seed=0)


def tiny_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "folder", "--root", str(root), "--model", "fcn_resnet18", "--variant", "8s",
            "--weights-backbone", "none", "--crop", "64x64", "--batch-size", "4", "--epochs", "2", "--workers", "0",
            "--out", str(out), "--seed", "0", "--no-progress", "--amp", "none", "--channels-last", "false", *extra]


def test_tiny_run_overfits(tmp_path):
    # Train and validate on the same 4 images with Adam: a working pipeline memorises them
    # (about 20 s on 2 cores; measured mIoU 0.95).
    from fcnseg.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "data", num_classes=2, n=5, size=(48, 64), seed=0, progress=False)
    config = resolve_config({
        "dataset": "folder", "root": str(root), "val_split": "train", "model": "fcn_resnet18",
        "variant": "8s", "weights_backbone": "none", "crop": (48, 64), "scale_range": None, "hflip": False,
        "batch_size": 4, "iterations": 120, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0,
        "schedule": "constant", "workers": 0, "amp": "none", "channels_last": False,
        "out": str(tmp_path / "run"), "eval_every": 1000, "save_every": 1000,
    })
    result = train(config, progress=False)
    assert result.final_metrics["miou"] > 0.9, result.final_metrics


def test_outputs_of_a_run(tiny_scenes, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_scenes, out)) == 0
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "metrics.json", "curves.png", "confusion.png"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all("miou" in r for r in records)
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["model_name"] == "fcn_resnet18" and checkpoint["model_kwargs"]["variant"] == "8s"
    assert checkpoint["config"]["crop"] == [64, 64] and len(checkpoint["classes"]) == 3
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 2 * (16 // 4)


def run_cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "fcnseg", *args], capture_output=True, text=True, env=env, timeout=300)


class KillAfterStep(Callback):
    """SIGKILLs its own process right after optimiser step ``step``, as a crash would, to test resume."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state, result) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


# The CLI's config for the given arguments, trained with a KillAfterStep callback (its source is pasted
# in): the kill must happen in a separate process, and the production loop has no kill switch.
KILLED_RUN = """
import json, os, signal, sys
from fcnseg.cli import build_parser
from fcnseg.cli.train import config_from_args
from fcnseg.training import Callback, train

{callback}
config = config_from_args(build_parser().parse_args(json.loads(sys.argv[1])))
train(config, progress=False, callbacks=[KillAfterStep(int(sys.argv[2]))])
"""


def run_killed(args: list[str], step: int) -> subprocess.CompletedProcess:
    program = KILLED_RUN.format(callback=inspect.getsource(KillAfterStep))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", program, json.dumps(args), str(step)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_resume_after_sigkill_gives_the_same_weights(tiny_scenes, tmp_path):
    common = ["--checkpoint-every", "2", "--epochs", "2"]
    straight = run_cli(tiny_args(tiny_scenes, tmp_path / "straight", *common))
    assert straight.returncode == 0, straight.stderr
    # Killed with SIGKILL after step 5 (mid-epoch 2; the last checkpoint is from step 4).
    killed = run_killed(tiny_args(tiny_scenes, tmp_path / "killed", *common), 5)
    assert killed.returncode == -9, killed.stderr
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["global_step"] == 4
    assert not list((tmp_path / "killed").glob("*.tmp"))
    resumed = run_cli(tiny_args(tiny_scenes, tmp_path / "killed", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["metrics"]["miou"] == b["metrics"]["miou"]


def test_resume_refuses_truncated_and_foreign_checkpoints(tiny_scenes, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        main_raises(tiny_args(tiny_scenes, out, "--resume"))
    torch.save({"state_dict": {}}, out / "last.pt")
    with pytest.raises(CheckpointError, match="not an fcnseg checkpoint"):
        main_raises(tiny_args(tiny_scenes, out, "--resume"))


def main_raises(argv):
    from fcnseg.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_scenes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_scenes, out, "--epochs", "1")) == 0
    before = (out / "last.pt").read_bytes()
    import fcnseg.training.loss

    real_loss = fcnseg.training.loss.fcn_cross_entropy  # the training loss of a single-process run
    calls = []

    def diverging_loss(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(fcnseg.training.loss, "fcn_cross_entropy", diverging_loss)
    status = main(tiny_args(tiny_scenes, out, "--epochs", "2", "--resume"))
    assert status == 1 and len(calls) == 2  # a failure at run time, not a usage error (fcnseg.errors)
    err = capsys.readouterr().err
    assert "loss is nan" in err and "last good checkpoint" in err and "--resume" in err and "--lr" in err
    assert (out / "last.pt").read_bytes() == before


def test_non_finite_batchnorm_statistics_are_not_saved_as_a_good_checkpoint(tiny_scenes, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_scenes, out, "--epochs", "1")) == 0
    before = (out / "last.pt").read_bytes()
    import fcnseg.training.loss

    real_loss = fcnseg.training.loss.fcn_cross_entropy

    def corrupting_loss(model, *args, **kwargs):  # the loss stays finite; one BatchNorm's statistics do not
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        norm.running_var[0] = float("inf")
        return real_loss(model, *args, **kwargs)

    monkeypatch.setattr(fcnseg.training.loss, "fcn_cross_entropy", corrupting_loss)
    assert main(tiny_args(tiny_scenes, out, "--epochs", "2", "--resume")) == 1
    assert "BatchNorm statistics became NaN or infinite" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before


def test_seed_makes_a_cpu_run_repeatable(tiny_scenes, tmp_path):
    for name in ("a", "b"):
        assert main(tiny_args(tiny_scenes, tmp_path / name, "--epochs", "1")) == 0
    a = load_checkpoint(tmp_path / "a" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_two_processes_train_and_agree_with_one_process_on_metrics(tiny_scenes, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fcnseg", *tiny_args(tiny_scenes, out, "--epochs", "1", "--batch-size", "2")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ddp_metrics = json.loads((out / "metrics.json").read_text())
    # The same checkpoint evaluated by one process: the confusion matrices reduced over the two
    # ranks' shards must give identical metrics.
    assert main(["eval", str(out / "last.pt"), "--dataset", "folder", "--root", str(tiny_scenes),
                 "--out", str(tmp_path / "eval.json"), "--device", "cpu"]) == 0
    single = json.loads((tmp_path / "eval.json").read_text())
    assert single["num_pixels"] == ddp_metrics["num_pixels"]
    for key in ("pixel_acc", "miou", "fwiou", "mean_acc"):
        assert single[key] == pytest.approx(ddp_metrics[key], abs=1e-6), key
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["global_step"] == 16 // (2 * 2)


def test_a_users_own_datasets_and_transforms_train_with_callbacks(tmp_path):
    from fcnseg.data import default_palette, eval_transforms

    normalise = eval_transforms()
    transformed = []

    def my_transforms(image, target):  # the images already have the crop's size: normalise only
        transformed.append(1)
        return normalise(image, target)

    recorder, plain_records = Recorder(), []
    result = train(user_config(tmp_path / "run"), train_dataset=Squares(8, seed=0), val_dataset=Squares(4, seed=1),
                   train_transforms=my_transforms, callbacks=[recorder], on_epoch_end=plain_records.append,
                   progress=False)
    assert result.last_checkpoint.exists() and result.best_checkpoint is not None
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "curves.png", "confusion.png"):
        assert (tmp_path / "run" / name).exists(), name
    checkpoint = load_checkpoint(result.last_checkpoint)
    assert checkpoint["classes"] == Squares.classes and checkpoint["global_step"] == 2 * (8 // 4)
    assert checkpoint["colors"] == [list(c) for c in default_palette(2)]
    assert len(transformed) == 2 * 8  # every training image of both epochs went through the given transforms
    # on_step_end: once per optimiser step, with the state already counting that step
    assert recorder.steps == [(1, 1, 4), (2, 2, 4), (3, 1, 4), (4, 2, 4)]
    # on_epoch_end: the metrics.jsonl record, once the epoch is counted; the plain function gets it too
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [epoch for epoch, _ in recorder.epochs] == [1, 2]
    assert [record for _, record in recorder.epochs] == records == plain_records
    assert all("miou" in r for r in records) and records[-1]["iteration"] == 4


def test_a_users_dataset_without_classes_is_refused(tmp_path):
    class Unnamed(Squares):
        classes = None

    with pytest.raises(FcnsegError, match="no `classes` attribute"):
        train(user_config(tmp_path / "run"), train_dataset=Unnamed(4, seed=0), val_dataset=Squares(4, seed=1),
              progress=False)
    with pytest.raises(FcnsegError, match="classes .* differ"):
        wrong = Squares(4, seed=1)
        wrong.classes = ["sky", "ground"]
        train(user_config(tmp_path / "run"), train_dataset=Squares(4, seed=0), val_dataset=wrong, progress=False)
    with pytest.raises(FcnsegError, match="no dataset root"):
        train(user_config(tmp_path / "run"), train_dataset=Squares(4, seed=0), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_refused_then_resumed_or_overwritten(tiny_scenes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_scenes, out, "--epochs", "1")) == 0
    first = (out / "metrics.jsonl").read_text()
    # The same command again would have clobbered the run: refused, exit status 2, nothing touched.
    capsys.readouterr()
    assert main(tiny_args(tiny_scenes, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--resume" in err and "--overwrite" in err and "another --out" in err
    assert (out / "metrics.jsonl").read_text() == first and not (out / ".lock").exists()
    # --resume continues it.
    assert main(tiny_args(tiny_scenes, out, "--epochs", "2", "--resume")) == 0
    assert load_checkpoint(out / "last.pt")["global_step"] == 8
    # --overwrite replaces it: the new run's records only; a user's file in the folder stays.
    (out / "notes.txt").write_text("mine")
    assert main(tiny_args(tiny_scenes, out, "--epochs", "1", "--overwrite")) == 0
    assert "--overwrite: removed the earlier run's" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1] and load_checkpoint(out / "last.pt")["global_step"] == 4
    assert (out / "notes.txt").read_text() == "mine"


def test_a_stale_lock_and_a_partial_checkpoint_are_cleared_by_the_next_run(tiny_scenes, tmp_path, capsys):
    from tests.training.test_run_dir import leave_stale_lock

    out = tmp_path / "run"
    dead = leave_stale_lock(out)  # a run killed by kill -9 ...
    (out / ".last.pt.x8f2k1.tmp").write_bytes(b"PK\x03\x04 half")  # ... while it wrote a checkpoint
    assert main(tiny_args(tiny_scenes, out, "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    assert f"taking over the lock of an earlier training run (pid {dead}" in printed
    assert ".last.pt.x8f2k1.tmp" in printed and "partly written" in printed
    assert not list(out.glob("*.tmp")) and not (out / ".lock").exists() and (out / "metrics.json").exists()


def test_progress_in_a_log_is_plain_bounded_lines(tmp_path, capfd):
    # stderr is captured (not a terminal): whole lines, never '\r' redraws, not one per step.
    import dataclasses
    import time

    tic = time.monotonic()
    train(dataclasses.replace(user_config(tmp_path / "run"), batch_size=2), train_dataset=Squares(16, seed=0),
          val_dataset=Squares(2, seed=1), progress=True)
    elapsed = time.monotonic() - tic
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert 2 <= len(lines) <= 2 + int(elapsed // 10) + 1, lines  # 16 steps: one line per epoch (+1 per 10 s)
    for epoch in (1, 2):
        last = [line for line in lines if line.startswith(f"epoch {epoch}/2: 8/8 step (100%)")]
        assert len(last) == 1, lines
        for field in ("step/s", "ETA", "loss=", "lr=", "img_s=", "run_eta="):
            assert field in last[0], last[0]
    quiet = tmp_path / "quiet"
    train(dataclasses.replace(user_config(quiet), batch_size=2, epochs=1), train_dataset=Squares(4, seed=0),
          val_dataset=Squares(2, seed=1), progress=False)
    assert "epoch 1/1" not in capfd.readouterr().err


def test_cached_images_train_the_same_weights(tiny_scenes, tmp_path):
    for name, extra in (("read", ()), ("cached", ("--cache-images",))):
        assert main(tiny_args(tiny_scenes, tmp_path / name, "--epochs", "1", *extra)) == 0
    read = load_checkpoint(tmp_path / "read" / "last.pt")["state_dict"]
    cached = load_checkpoint(tmp_path / "cached" / "last.pt")["state_dict"]
    assert all(torch.equal(read[k], cached[k]) for k in read)
    assert "cache_images: true" in (tmp_path / "cached" / "config.yaml").read_text()
