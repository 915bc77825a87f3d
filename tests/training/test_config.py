"""Option precedence: defaults < recipe < YAML file < explicit options."""
from __future__ import annotations

import pytest

from fcnseg.errors import FcnsegError
from fcnseg.training.config import RECIPES, TrainConfig, parse_size, resolve_config


def test_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.05\nbatch-size: 3\nrecipe: d2l\n")
    config = resolve_config({"root": "r", "batch_size": 5}, str(path))
    assert config.recipe == "d2l"
    assert config.lr == 0.05  # file beats recipe
    assert config.batch_size == 5  # explicit beats file
    assert config.momentum == 0.0 and config.loss_reduction == "d2l"  # from the recipe
    assert config.variant == "32s" and config.drop_small and config.border_as_background


def test_d2l_recipe_is_the_chapter():
    config = resolve_config({"root": "r"}, recipe="d2l")
    assert (config.model, config.variant, config.lr, config.weight_decay, config.batch_size, config.epochs) == (
        "fcn_resnet18", "32s", 1e-3, 1e-3, 32, 5)
    assert config.crop == (320, 480) and config.scale_range is None and not config.hflip
    assert RECIPES["default"] == {}
    assert TrainConfig().variant == "8s"


def test_bad_values_are_refused(tmp_path):
    with pytest.raises(FcnsegError, match="optimizer"):
        resolve_config({"root": "r", "optimizer": "lbfgs"})
    with pytest.raises(FcnsegError, match="root"):
        resolve_config({})
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    with pytest.raises(FcnsegError, match="learning_rate"):
        resolve_config({"root": "r"}, str(bad))
    with pytest.raises(FcnsegError, match="HxW"):
        parse_size("320 by 480")
    assert parse_size("320x480") == (320, 480) and parse_size("64") == (64, 64)
    assert resolve_config({"root": "r", "weights_backbone": "none"}).weights_backbone is None


def test_no_scale_option_turns_scaling_off():
    from fcnseg.cli import build_parser
    from fcnseg.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--root", "r", "--no-scale"])
    assert config_from_args(args).scale_range is None
    args = build_parser().parse_args(["train", "--root", "r", "--scale-range", "0.5", "1.5"])
    assert config_from_args(args).scale_range == (0.5, 1.5)


@pytest.mark.parametrize("cores,workers", [(1, 0), (2, 0), (4, 2), (16, 4), (None, 0)])
def test_loader_workers_default_to_none_on_two_cores(monkeypatch, cores, workers):
    import fcnseg.training.config

    monkeypatch.setattr(fcnseg.training.config.os, "cpu_count", lambda: cores)
    assert fcnseg.training.config.default_workers() == workers
    assert resolve_config({"root": "r"}).workers == workers
    assert resolve_config({"root": "r", "workers": 3}).workers == 3
