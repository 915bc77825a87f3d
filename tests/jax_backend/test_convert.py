"""Weights both ways: PyTorch state dict -> Flax variables -> state dict gives back the same tensors."""
from __future__ import annotations

import pytest
import torch

from fcnseg.errors import CheckpointError
from fcnseg.jax_backend.convert import flax_model_of, flax_to_torch, from_torch_model, torch_to_flax
from fcnseg.models.inference_form import inference_form
from tests.jax_backend.conftest import random_fcn


def _assert_same_state(got: dict, expected: dict) -> None:
    assert list(sorted(got)) == list(sorted(expected))
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name,variant,upsampler", [("fcn_resnet18", "8s", "bilinear"),
                                                    ("fcn_mobilenet_v2", "16s", "fixed"),
                                                    ("fcn_mobilenet_v2", "4s", "bilinear")])
def test_round_trip_is_identical(name, variant, upsampler):
    model = random_fcn(name, variant, upsampler=upsampler)
    counter = next(v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked"))
    counter.fill_(7)  # a counter that trained for a while
    module, variables = from_torch_model(model)
    assert set(variables) == {"params", "batch_stats"}
    assert variables["params"]["backbone"]["stage8"]["0" if name == "fcn_resnet18" else "0.0"]["kernel"].shape[:2] == (
        (7, 7) if name == "fcn_resnet18" else (3, 3))
    _assert_same_state(flax_to_torch(variables), model.state_dict())


def test_inference_form_round_trip():
    folded = inference_form(random_fcn("fcn_mobilenet_v2", "8s"))
    module, variables = from_torch_model(folded)
    assert module.folded and "batch_stats" not in variables
    _assert_same_state(flax_to_torch(variables), {k: v.contiguous() for k, v in folded.state_dict().items()})


def test_loading_is_strict():
    model = random_fcn("fcn_resnet18", "32s")
    module = flax_model_of(model)
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "score32.bias"}
    with pytest.raises(CheckpointError, match="missing 1 \\[score32.bias\\]"):
        torch_to_flax(missing, module)
    with pytest.raises(CheckpointError, match="unexpected 1 \\[extra.weight\\]"):
        torch_to_flax({**state, "extra.weight": torch.zeros(1)}, module)
    wrong = {**state, "score32.weight": torch.zeros(3, 512, 3, 3)}
    with pytest.raises(CheckpointError, match="score32.weight has shape"):
        torch_to_flax(wrong, module)


def test_only_fcnseg_models_convert():
    with pytest.raises(CheckpointError, match="fcnseg FCNs only"):
        flax_model_of(torch.nn.Conv2d(3, 3, 1))


def test_a_variant_without_a_flax_model_is_refused_by_name():
    with pytest.raises(CheckpointError, match="no Flax model for FCN-2s .*--backend torch"):
        flax_model_of(random_fcn("fcn_resnet18", "2s"))
