"""Option precedence (defaults < recipe < YAML file < explicit options), typed YAML values, value checks."""
from __future__ import annotations

import pytest
import torch
import yaml

from fcnseg.errors import FcnsegError, OptionError
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


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_take_their_field_types(tmp_path):
    config = resolve_config({"root": "r"}, write(tmp_path, (
        "lr: 1e-3\n"  # PyYAML reads an exponent without a dot as a string
        "crop: 256x352\nhflip: 'no'\nchannels_last: Off\nscale_range: [0.5, 1.5]\nweights_backbone: null\n"
        "max_val_images: '10'\nepochs: 2.0\nworkers: 0\nfeature_cache: none\n")))
    assert config.lr == 1e-3 and isinstance(config.lr, float)
    assert config.crop == (256, 352) and config.hflip is False and config.channels_last is False
    assert config.scale_range == (0.5, 1.5) and config.weights_backbone is None and config.feature_cache is None
    assert config.max_val_images == 10 and config.epochs == 2 and isinstance(config.epochs, int)
    config = resolve_config({"root": "r"}, write(tmp_path, "crop: [256, 352]\nscale_range: none\nhflip: YES\n"))
    assert config.crop == (256, 352) and config.scale_range is None and config.hflip is True


@pytest.mark.parametrize("text,key,what", [
    ("epochs: two", "epochs", "whole number"),
    ("hflip: maybe", "hflip", "yes or no"),
    ("lr: fast", "lr", "a number"),
    ("crop: big", "crop", "HxW"),
    ("crop: [1, 2, 3]", "crop", "HxW"),
    ("scale_range: 0.5", "scale_range", "two numbers"),
    ("batch_size: 2.5", "batch_size", "whole number"),
    ("dataset: [a]", "dataset", "text"),
    ("epochs: 0", "epochs", ">= 1"),
    ("lr: -0.1", "lr", "> 0"),
])
def test_a_bad_yaml_value_is_refused_naming_the_file_and_the_key(tmp_path, text, key, what):
    path = write(tmp_path, text + "\n")
    with pytest.raises(OptionError) as info:
        resolve_config({"root": "r"}, path)
    assert f"config {path}: {key} must be" in str(info.value) and what in str(info.value)


@pytest.mark.parametrize("key,value,what", [
    ("lr", 0.0, "> 0"), ("lr", -1.0, "> 0"), ("lr", float("nan"), "> 0"),
    ("workers", -1, ">= 0"), ("batch_size", 0, ">= 1"), ("accumulate", 0, ">= 1"),
    ("epochs", 0, "0 would train nothing"), ("iterations", 0, "0 would train nothing"),
    ("momentum", -0.5, ">= 0"), ("weight_decay", -1e-4, ">= 0"), ("color_jitter", -1.0, ">= 0"),
    ("eval_every", 0, ">= 1"), ("save_every", 0, ">= 1"), ("checkpoint_every", -1, ">= 0"),
    ("max_val_images", 0, ">= 1"), ("crop", (16, 480), ">= 32"), ("scale_range", (2.0, 0.5), "MIN <= MAX"),
    ("cache_features", -1, ">= 0"), ("amp", "fp8", "auto, bf16, fp16, none"), ("copy_paste_prob", 1.5, "from 0 to 1"),
    ("hue_jitter", 0.6, "from 0 to 0.5"), ("hue_jitter", -0.1, "from 0 to 0.5"),
    ("model", "fcn_vgg16", "fcn_resnet18, fcn_resnet34, fcn_resnet50, fcn_mobilenet_v2"),
])
def test_values_out_of_range_are_refused_naming_the_option(key, value, what):
    with pytest.raises(OptionError) as info:
        resolve_config({"root": "r", key: value})
    message = str(info.value)
    assert message.startswith(f"{key} (--{key.replace('_', '-')}) must be") and what in message


def test_a_device_that_is_not_here_is_a_usage_error():
    with pytest.raises(OptionError, match="--device gpu"):
        resolve_config({"root": "r", "device": "gpu"})
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA is not available"):
            resolve_config({"root": "r", "device": "cuda"})


def test_a_config_built_in_python_is_converted_and_checked_by_validate():
    config = TrainConfig(lr="1e-3", crop="64x96", hflip="off", scale_range=[0.5, 1], epochs="3").validate()
    assert (config.lr, config.crop, config.hflip, config.scale_range, config.epochs) == (1e-3, (64, 96), False,
                                                                                        (0.5, 1.0), 3)
    with pytest.raises(OptionError, match=r"epochs \(--epochs\) must be a whole number >= 1"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(OptionError, match="freeze-backbone"):
        TrainConfig(cache_features=2).validate()
    assert TrainConfig().validate() == TrainConfig()  # the defaults pass; a root is not needed here


def test_the_printed_config_is_the_saved_one_and_reads_back():
    config = resolve_config({"root": "r", "crop": "64x96", "lr": "0.01"})
    text = config.to_yaml()
    assert "crop:\n- 64\n- 96\n" in text and "lr: 0.01\n" in text
    assert TrainConfig(**yaml.safe_load(text)).validate() == config
