"""The `fcnseg` entry point: help, version, and clean errors."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fcnseg import __version__
from fcnseg.cli import build_parser, main
from fcnseg.cli.options import DefaultsHelpFormatter


def test_version_and_help_list_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for command in ("demo", "train", "eval", "predict", "export", "download", "make-synthetic"):
        assert command in help_text, command


def test_console_script_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "fcnseg", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fcnseg {__version__}"


def test_bad_size_is_a_usage_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "--crop", "big"])
    assert info.value.code == 2
    assert "--crop" in capsys.readouterr().err


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    status = main(["train", "--dataset", "folder", "--root", str(tmp_path / "nowhere"), "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err and "nowhere" in err


@pytest.mark.parametrize("command", ["train", "eval", "tune", "demo", "predict", "export"])
def test_help_names_real_defaults_only(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    assert "default: None" not in text
    assert "(default: None)" not in text


def test_info_lists_models_and_says_whether_the_softmax_kernel_is_used(capsys, monkeypatch):
    monkeypatch.setenv("FCNSEG_NATIVE", "0")
    assert main(["info", "--size", "64x64"]) == 0
    out = capsys.readouterr().out
    assert "not used (disabled by FCNSEG_NATIVE=0)" in out
    assert "fcn_resnet18" in out and "(1, 21, 64, 64)" in out
    import torch

    from fcnseg.inference.backends import auto_choice
    from fcnseg.runtime import resolve_amp_dtype, select_device

    device = select_device("auto")
    engine = auto_choice(device, resolve_amp_dtype("auto", device))
    assert f"prediction by default (backend auto, amp auto): {engine} on {device}" in out
    assert engine in ("openvino", "torch") and isinstance(device, torch.device)


@pytest.mark.parametrize("installed", [True, False])
def test_info_says_which_decoder_reads_png_photos(capsys, monkeypatch, installed):
    from fcnseg.data import fast_png

    if installed:
        pytest.importorskip("pyspng")
    else:
        monkeypatch.setattr(fast_png, "pyspng", None)
    assert main(["info", "--size", "32x32"]) == 0
    out = capsys.readouterr().out
    expected = "libspng (pyspng)" if installed else "Pillow (pip install 'fcnseg[fast-png]'"
    assert f"PNG photos decoded by {expected}" in out


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_predicting_commands_share_names_and_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--device DEVICE auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default: auto)",
                  "(default: auto)", "--mode {whole,sliding}", "--window HxW", "--stride HxW", "--flip, --no-flip",
                  "--progress, --no-progress", "--max-pixels N", "(default: 89,478,485)"):
        assert shown in text, shown
    assert "(if not given" not in text and "(default " not in text  # one way: "(default: X)"


@pytest.mark.parametrize("command", ["eval", "predict", "export", "download", "make-synthetic", "info"])
def test_every_boolean_is_a_flag_pair(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            pytest.fail(f"fcnseg {command} {action.option_strings[0]} is a one-way switch, not --flag/--no-flag")
    assert isinstance(sub.formatter_class, type) and issubclass(sub.formatter_class, DefaultsHelpFormatter)


def test_eval_amp_defaults_to_auto_as_in_train():
    args = build_parser().parse_args(["eval", "m.pt"])
    assert (args.amp, args.device, args.progress, args.flip, args.split) == ("auto", "auto", True, False, "val")
    args = build_parser().parse_args(["predict", "m.pt", "x.jpg", "--out", "o", "--no-progress", "--flip"])
    assert (args.amp, args.progress, args.flip, args.overwrite) == ("auto", False, True, False)
    assert build_parser().parse_args(["export", "m.pt", "--no-verify"]).verify is False


def test_a_closed_output_pipe_ends_quietly_with_141():
    # `fcnseg info` prints a line per model; `head -1` closes the pipe after the first.
    script = f"set -o pipefail; OMP_NUM_THREADS=1 {sys.executable} -m fcnseg info | head -1"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith("fcnseg ") and proc.stdout.count("\n") == 1
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
