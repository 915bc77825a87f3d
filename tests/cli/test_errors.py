"""Exit statuses and messages of `fcnseg.cli.main`: 2 for a usage error, 1 for a failure at run time,
130 on Ctrl-C; warnings as one clean line; no advice to load a checkpoint with weights_only=False."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch

import fcnseg.cli.info as info_command
from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.data.synthetic import make_synthetic
from fcnseg.errors import (
    CheckpointError,
    DataError,
    FcnsegError,
    OptionError,
    UsageError,
    WeightsError,
)
from fcnseg.models.checkpoint import make_checkpoint


def _command_raising(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Makes `fcnseg info` raise ``error`` (the parser binds the module's `run` when it is built)."""
    def run(args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(info_command, "run", run)


@pytest.mark.parametrize(("error", "status"), [
    (OptionError("--lr must be positive"), 2),
    (UsageError("config.yaml: epochs must be a whole number"), 2),
    (DataError("x.png: cannot decode image"), 1),
    (CheckpointError("cannot read checkpoint m.pt"), 1),
    (WeightsError("cannot download weights"), 1),
    (FcnsegError("the loss diverged"), 1),
    (KeyboardInterrupt(), 130),
])
def test_exit_status_of_each_kind_of_error(error, status, monkeypatch, capsys):
    _command_raising(monkeypatch, error)
    assert main(["info"]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(error, FcnsegError):
        assert err == f"fcnseg info: error: {error}\n"
    else:
        assert err == "fcnseg info: interrupted\n"


def test_usage_errors_are_value_errors_and_fcnseg_errors():
    # argparse types may raise OptionError; library callers may catch ValueError or FcnsegError.
    assert issubclass(OptionError, UsageError) and issubclass(OptionError, ValueError)
    assert issubclass(UsageError, FcnsegError)
    assert OptionError.exit_status == UsageError.exit_status == 2
    assert FcnsegError.exit_status == DataError.exit_status == CheckpointError.exit_status == 1


def test_a_bug_keeps_its_traceback(monkeypatch):
    _command_raising(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["info"])


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", "m.pt", "--batch-size", "0"])
    assert exited.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def test_warnings_are_one_clean_line_and_the_hooks_are_restored(monkeypatch, capsys):
    def run(args: argparse.Namespace) -> int:
        warnings.warn("3 images without a mask were skipped:\n  a.jpg, b.jpg", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(info_command, "run", run)
    before = warnings.showwarning, warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["info"]) == 0
    err = capsys.readouterr().err
    assert err == "fcnseg: warning: 3 images without a mask were skipped: a.jpg, b.jpg\n"
    assert ".py" not in err and "UserWarning" not in err
    assert (warnings.showwarning, warnings.formatwarning) == before


def test_a_checkpoint_with_code_is_refused_without_advice_to_run_it(tmp_path, capsys):
    root = make_synthetic(tmp_path / "data", num_classes=3, n=5, size=(32, 32), seed=0, progress=False)
    model = fcn_resnet18(num_classes=3, weights_backbone=None)
    checkpoint = make_checkpoint(model, classes=["a", "b", "c"], colors=[(0, 0, 0), (1, 1, 1), (2, 2, 2)])
    checkpoint["extra"] = argparse.Namespace(note="a pickled object: code runs when it is unpickled")
    torch.save(checkpoint, tmp_path / "evil.pt")
    status = main(["eval", str(tmp_path / "evil.pt"), "--dataset", "folder", "--root", str(root),
                   "--device", "cpu", "--out", str(tmp_path / "e.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1  # the file exists; its content cannot be read: a failure at run time
    assert "cannot read checkpoint" in err and "evil.pt" in err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


def test_an_error_in_a_dataloader_worker_is_one_line_without_the_workers_traceback(tmp_path, capsys):
    data = tmp_path / "data"
    make_synthetic(data, num_classes=3, n=12, size=(64, 96), seed=0, progress=False)
    first = sorted((data / "images").iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated: found by a worker while training
    status = main(["train", "--root", str(data), "--out", str(tmp_path / "run"), "--weights-backbone", "none",
                   "--crop", "64x96", "--epochs", "1", "--batch-size", "4", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1] == f"fcnseg train: error: {first}: cannot decode image (OSError: image file is truncated); " \
                      "the file is corrupt or truncated"
    assert not any("Traceback" in line or "DataLoader worker" in line for line in err)
