"""The options of `fcnseg train`, `tune` and `demo`: each mistake is a one-line usage error (exit
status 2) that names the option, found before any data is read; --print-config; --flag/--no-flag."""
from __future__ import annotations

import pytest
import torch
import yaml

from fcnseg.cli import build_parser, main
from fcnseg.cli.train import config_from_args

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def train_args(tmp_path, *extra: str) -> list[str]:
    """A train command whose data does not exist: a refusal must be about the option, not the data."""
    return ["train", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--no-progress", *extra]


def usage_error(capsys, argv: list[str]) -> str:
    """Runs ``argv``, expects exit status 2, returns stderr (argparse exits; our checks return 2)."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("option,value", [
    ("--lr", "-0.1"), ("--lr", "0"), ("--workers", "-1"), ("--batch-size", "0"), ("--epochs", "0"),
    ("--iterations", "0"), ("--momentum", "-1"), ("--weight-decay", "-1"), ("--eval-every", "0"),
    ("--save-every", "0"), ("--checkpoint-every", "-1"), ("--accumulate", "0"), ("--max-val-images", "0"),
    ("--cache-features", "-2"), ("--crop", "big"), ("--hflip", "maybe"),
])
def test_a_bad_count_or_number_names_the_option(tmp_path, capsys, option, value):
    err = usage_error(capsys, train_args(tmp_path, option, value))
    assert option in err and "nowhere" not in err


@pytest.mark.parametrize("extra,expected", [
    (("--model", "fcn_vgg16"), "fcn_resnet18, fcn_resnet34, fcn_resnet50, fcn_mobilenet_v2"),
    (("--crop", "16x480"), "crop (--crop) must be a size HxW with both sides >= 32"),
    (("--device", "gpu"), "--device gpu"),
    (("--cache-features", "2"), "--freeze-backbone"),
    (("--scale-range", "2", "1"), "MIN <= MAX"),
    (("--holdout-groups", "^[^_]+"), "give --holdout F too"),
    (("--holdout", "0.2", "--holdout-groups", "(["), "--holdout-groups '([' is not a regular expression"),
    (("--copy-paste-prob", "1.5"), "copy_paste_prob (--copy-paste-prob) must be a number from 0 to 1"),
])
def test_bad_values_are_refused_before_the_data_is_read(tmp_path, capsys, extra, expected):
    err = usage_error(capsys, train_args(tmp_path, *extra))
    assert expected in err and "nowhere" not in err
    assert not (tmp_path / "run").exists()


@no_cuda
def test_device_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    err = usage_error(capsys, train_args(tmp_path, "--device", "cuda"))
    assert "CUDA is not available" in err and "nowhere" not in err


def test_a_bad_config_file_value_names_the_file_and_the_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: two\n")
    err = usage_error(capsys, train_args(tmp_path, "--config", str(path)))
    assert f"config {path}: epochs must be a whole number, got 'two'" in err
    err = usage_error(capsys, train_args(tmp_path, "--config", str(tmp_path / "missing.yaml")))
    assert "cannot read config" in err


def test_paths_are_checked_before_training(tmp_path, capsys):
    err = usage_error(capsys, train_args(tmp_path))
    assert "--root" in err and "nowhere" in err
    (tmp_path / "data").mkdir()
    (tmp_path / "file").write_text("x")
    err = usage_error(capsys, ["train", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "file")])
    assert "--out" in err and "is a file" in err


def test_print_config_prints_the_resolved_yaml_and_exits(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\ncrop: 256x352\nhflip: 'no'\n")
    assert main(train_args(tmp_path, "--config", str(path), "--batch-size", "3", "--print-config")) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == 1e-3 and printed["crop"] == [256, 352] and printed["hflip"] is False
    assert printed["batch_size"] == 3 and printed["root"] == str(tmp_path / "nowhere")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    assert main(["train", "--recipe", "d2l", "--print-config"]) == 0  # no --root needed to look
    assert yaml.safe_load(capsys.readouterr().out)["variant"] == "32s"


def test_tune_print_config_shows_what_every_trial_shares(tmp_path, capsys):
    assert main(["tune", "--root", "r", "--lr", "0.01", "--out", str(tmp_path / "study"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# fcnseg tune") and yaml.safe_load(out)["lr"] == 0.01
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("extra,expected", [
    (("--trials", "0"), "--trials"), (("--lr-range", "0.1", "0.01"), "--lr-range"),
    (("--weight-decay-range", "0", "1"), "--weight-decay-range"), (("--crops", "16x16"), "--crops"),
    (("--batch-sizes", "4", "0"), "--batch-sizes"), (("--model", "nope"), "fcn_resnet18"),
])
def test_tune_refuses_bad_search_options(tmp_path, capsys, extra, expected):
    err = usage_error(capsys, ["tune", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s"), *extra])
    assert expected in err and "nowhere" not in err


def parse(*argv: str):
    return config_from_args(build_parser().parse_args(["train", "--root", "r", *argv]))


def test_booleans_are_flags_and_the_older_value_spelling_still_works():
    assert parse().hflip is True and parse("--no-hflip").hflip is False
    assert parse("--hflip", "false").hflip is False and parse("--hflip", "yes").hflip is True
    assert parse("--freeze-backbone").freeze_backbone and parse("--freeze-backbone", "true").freeze_backbone
    assert not parse("--recipe", "d2l").hflip and parse("--recipe", "d2l", "--hflip").hflip  # the recipe is overridden
    assert parse("--no-channels-last").channels_last is False and parse("--drop-small").drop_small
    assert parse("--overwrite").overwrite and not parse().overwrite and parse("--resume").resume
    args = build_parser().parse_args(["train", "--no-progress"])
    assert args.progress is False


def test_a_negative_flag_takes_no_value(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "--no-hflip", "true"])
    assert info.value.code == 2 and "--no-hflip" in capsys.readouterr().err


def test_tune_overwrite_is_for_the_study_not_the_trials():
    args = build_parser().parse_args(["tune", "--root", "r", "--overwrite"])
    assert args.overwrite_study is True and config_from_args(args).overwrite is False


@pytest.mark.parametrize("extra,expected", [
    (("--size", "16x16"), "crop (--crop) must be a size HxW with both sides >= 32"),
    (("--images", "9"), "--images must be at least 10"),
    (("--device", "gpu"), "--device gpu"),
])
def test_demo_refuses_bad_options_before_drawing_scenes(tmp_path, capsys, extra, expected):
    err = usage_error(capsys, ["demo", "--out", str(tmp_path / "demo"), "--no-progress", *extra])
    assert expected in err
    assert not (tmp_path / "demo" / "data").exists()


@pytest.mark.parametrize("command", ["train", "tune", "demo"])
def test_help_shows_flags_both_ways_and_defaults_one_way(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--progress, --no-progress" in text and "(default: True)" in text
    assert "[PROGRESS]" not in text and "default None" not in text
    if command == "train":
        assert "--hflip, --no-hflip" in text and "(default: 320x480)" in text and "(default: 0.02)" in text


def test_train_variant_4s_runs_an_epoch_and_saves_a_4s_checkpoint(tmp_path, capsys):
    from fcnseg.data.synthetic import make_synthetic
    from fcnseg.models.checkpoint import load_checkpoint, model_from_checkpoint

    root = make_synthetic(tmp_path / "data", num_classes=3, n=4, size=(40, 56), seed=0, progress=False)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(root), "--model", "fcn_resnet18", "--variant", "4s",
                 "--weights-backbone", "none", "--epochs", "1", "--batch-size", "2", "--crop", "32x32", "--amp", "none",
                 "--channels-last", "false", "--workers", "0", "--no-progress", "--out", str(run)]) == 0
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["model_kwargs"]["variant"] == "4s" and checkpoint["epoch"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["variant"] == "4s"
    model = model_from_checkpoint(checkpoint)
    assert model.upsample_final.stride == 4 and torch.count_nonzero(model.score4.weight) > 0  # the new skip trained
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 56)).shape == (1, 3, 40, 56)


def test_tune_accepts_variant_4s(tmp_path, capsys):
    assert main(["tune", "--root", "r", "--variant", "4s", "--out", str(tmp_path / "study"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["variant"] == "4s"


def test_train_copy_paste_runs_and_an_unknown_class_is_a_usage_error(tmp_path, capsys):
    from fcnseg.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "data", num_classes=3, n=4, size=(40, 56), seed=0, progress=False)
    common = ["train", "--dataset", "folder", "--root", str(root), "--model", "fcn_resnet18", "--weights-backbone",
              "none", "--epochs", "1", "--batch-size", "2", "--crop", "32x32", "--amp", "none", "--workers", "0",
              "--no-progress"]
    err = usage_error(capsys, [*common, "--copy-paste", "disc", "--out", str(tmp_path / "bad")])
    assert "--copy-paste: 'disc' is not a class" in err and "striped disc" in err
    assert main([*common, "--copy-paste", "striped disc", "--copy-paste-prob", "0.75", "--out", str(tmp_path / "run")]) == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["copy_paste"] == "striped disc" and config["copy_paste_prob"] == 0.75
