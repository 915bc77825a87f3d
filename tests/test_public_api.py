"""The names a user imports from `fcnseg`, and the registries they cannot change."""
from __future__ import annotations

import subprocess
import sys

import pytest

import fcnseg


def test_the_documented_imports_work() -> None:
    from fcnseg import Segmenter, TrainConfig, build_dataset, build_model, list_models, train
    from fcnseg.data import build_dataset as data_build_dataset
    from fcnseg.inference import Segmenter as InferenceSegmenter
    from fcnseg.training import TrainConfig as TrainingConfig
    from fcnseg.training import train as training_train

    assert Segmenter is InferenceSegmenter and train is training_train and TrainConfig is TrainingConfig
    assert build_dataset is data_build_dataset
    assert "fcn_resnet18" in list_models()
    assert build_model("fcn_resnet18", num_classes=3, weights_backbone=None).model_name == "fcn_resnet18"


def test_every_name_in_all_resolves() -> None:
    for name in fcnseg.__all__:
        assert getattr(fcnseg, name) is not None, name
    assert set(fcnseg.__all__) <= set(dir(fcnseg))


def test_an_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Segmentor'"):
        fcnseg.Segmentor  # noqa: B018


def test_the_model_registry_is_read_only() -> None:
    from fcnseg.models import BACKBONES, MODEL_BUILDERS

    with pytest.raises(TypeError):
        MODEL_BUILDERS["mine"] = lambda **kwargs: None  # type: ignore[index]
    with pytest.raises(TypeError):
        BACKBONES["mine"] = None  # type: ignore[index]
    names = fcnseg.list_models()
    names.append("mine")
    assert "mine" not in fcnseg.list_models()
    with pytest.raises(ValueError, match="unknown model 'mine'"):
        fcnseg.build_model("mine")


def test_importing_fcnseg_does_not_load_training_or_plotting() -> None:
    # The CLI and `import fcnseg` stay fast: training, datasets and matplotlib load on first use.
    code = ("import sys, fcnseg; print(sorted(m for m in ('fcnseg.training', 'fcnseg.inference', 'fcnseg.data', "
            "'matplotlib') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
