"""The "torch-int8" engine (PT2E with torchao's x86 inductor quantizer): calibrated INT8 logits
against float32, one quantised model per input shape, and the mistakes it refuses."""
from __future__ import annotations

import pytest
import torch

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.errors import OptionError
from fcnseg.inference.segmenter import Segmenter
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint
from tests.conftest import gradient_photo, three_class_tiny_fcn

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("torchao")
    return three_class_tiny_fcn()


def test_int8_logits_follow_float32_and_each_shape_gets_its_model(model):
    calibration = [gradient_photo(64, 96, seed) for seed in range(8)]
    int8 = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend="torch-int8", calibration=calibration)
    fp32 = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend="torch")
    for size, seed in (((64, 96), 20), ((67, 93), 21)):  # the calibration size and another one
        image = fp32.preprocess(gradient_photo(*size, seed=seed)).unsqueeze(0)
        want, got = fp32.logits(image), int8.logits(image)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert len(want.argmax(1).unique()) == 3  # the masks compared are not constant
        # int8 rounding, not another function: the error is a few percent of the logits' spread
        assert (got - want).abs().mean() < 0.05 * want.std()
        assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.9
        assert not torch.equal(got, want)  # it is not the float32 model running
    assert sorted(int8.engine.built) == [(1, 3, 64, 96), (1, 3, 67, 93)]


def test_every_convolution_is_quantised_those_fused_with_their_activation_too(model):
    """The inference form fuses each Conv2d + ReLU into one `ConvActivation`, which the quantizer
    does not recognise; the engine quantises the unfused layers, so every convolution reads int8."""
    calibration = [gradient_photo(64, 96, seed) for seed in range(2)]
    int8 = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend="torch-int8", calibration=calibration)
    assert any(type(m).__name__ == "ConvActivation" for m in int8.model.modules())  # the form the engine got
    int8.logits(int8.preprocess(calibration[0]).unsqueeze(0))
    graph = int8.engine.built[(1, 3, 64, 96)].compiled._orig_mod.graph  # the converted model, before inductor
    convs = [node for node in graph.nodes if node.target == torch.ops.aten.conv2d.default]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 0
    for conv in convs:
        assert "dequantize" in str(conv.args[0].target), f"{conv.name} reads float32 {conv.args[0].target}"


def test_no_calibration_images_is_refused(model):
    with pytest.raises(OptionError, match="needs calibration images: --calibration DIR"):
        Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend="torch-int8")


def test_cli_calibration_without_the_int8_backend_is_a_usage_error(tmp_path, capsys):
    net = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None)
    checkpoint = save_checkpoint(make_checkpoint(net, classes=CLASSES, colors=COLORS), tmp_path / "m.pt")
    status = main(["predict", str(checkpoint), str(tmp_path), "--calibration", str(tmp_path), "--no-progress",
                   "--out", str(tmp_path / "out")])
    assert status == 2 and "--calibration calibrates --backend torch-int8" in capsys.readouterr().err
