"""The "jax" engine behind `Segmenter`: the PyTorch engine's logits and masks, whole and sliding."""
from __future__ import annotations

import pytest
import torch

from fcnseg.errors import OptionError
from fcnseg.inference.backends import EngineRequest, make_engine
from fcnseg.inference.segmenter import Segmenter
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint
from tests.jax_backend.conftest import assert_logits_match, random_fcn

CLASSES = ["background", "a", "b"]
COLORS = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


@pytest.fixture(scope="module")
def model():
    return random_fcn("fcn_mobilenet_v2", "8s", seed=2)


@pytest.fixture(scope="module")
def image():
    generator = torch.Generator().manual_seed(3)
    return torch.rand(3, 70, 90, generator=generator)


def _segmenters(model, **options):
    return (Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend="torch", **options),
            Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend="jax", **options))


@pytest.mark.parametrize("options", [{"mode": "whole", "flip": True},
                                     {"mode": "sliding", "window": (48, 64), "stride": (32, 40)}])
def test_segmenter_jax_matches_torch(model, image, options):
    torch_seg, jax_seg = _segmenters(model, **options)
    batch = torch_seg.preprocess(image)[None]
    assert_logits_match(jax_seg.logits(batch).numpy(), torch_seg.logits(batch).numpy())
    agree = (jax_seg.predict(image) == torch_seg.predict(image)).mean()
    assert agree >= 0.999


def test_engine_takes_the_model_as_built(model, image):
    """Without the inference form (``optimize=False``) BatchNorm runs on its running statistics."""
    torch_seg, jax_seg = _segmenters(model, optimize=False)
    batch = torch_seg.preprocess(image)[None]
    assert_logits_match(jax_seg.logits(batch).numpy(), torch_seg.logits(batch).numpy())


def test_from_checkpoint(model, image, tmp_path):
    path = save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS), tmp_path / "m.pt")
    torch_seg = Segmenter.from_checkpoint(path, device="cpu", amp="none")
    jax_seg = Segmenter.from_checkpoint(path, device="cpu", amp="none", backend="jax")
    assert (jax_seg.predict(image) == torch_seg.predict(image)).mean() >= 0.999


def test_bfloat16_runs_close_to_float32(model, image):
    torch_seg, _ = _segmenters(model)
    jax_bf16 = Segmenter(model, CLASSES, COLORS, device="cpu", amp="bf16", backend="jax")
    batch = torch_seg.preprocess(image)[None]
    reference, logits = torch_seg.logits(batch), jax_bf16.logits(batch)
    assert logits.dtype == torch.float32
    error = (logits - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05  # bf16 rounding: not float32's result, yet close to it


def test_refusals(model):
    with pytest.raises(OptionError, match="amp bf16 or --amp none"):
        make_engine("jax", EngineRequest(model, torch.device("cpu"), torch.float16))
    tiny = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(OptionError, match="fcnseg FCNs only"):
        make_engine("jax", EngineRequest(tiny, torch.device("cpu"), None))


def test_engine_compiles_once_per_shape(model):
    from fcnseg.jax_backend.engine import forward

    before = forward._cache_size()
    engines = [make_engine("jax", EngineRequest(model, torch.device("cpu"), None)) for _ in range(2)]
    for engine, shape in zip(engines * 2, [(1, 3, 32, 40), (1, 3, 32, 40), (2, 3, 33, 41), (2, 3, 33, 41)]):
        out = engine(torch.randn(shape))
        assert out.shape == (shape[0], 3, *shape[2:]) and out.dtype == torch.float32
    assert forward._cache_size() - before == 2  # two shapes; the second engine reuses the first's
