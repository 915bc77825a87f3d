"""experiments/dilated_probe.py: the dilated deepest stage computes the plain stage on a finer grid."""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from fcnseg import build_model
from tests.conftest import REPO_ROOT  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
from dilated_probe import DilatedDepthwiseConv2d, dilate_stage, with_stride16  # noqa: E402


def test_dilated_stage_at_even_positions_is_the_plain_stage():
    """The a trous identity: stride 1 plus dilation 2 after it, sampled every second pixel, is the strided stage."""
    torch.manual_seed(0)
    plain = build_model("fcn_mobilenet_v2", variant="4s", num_classes=5, weights_backbone=None).backbone.stage32
    for module in plain.modules():  # weights that keep the signal's scale through the stage, and BatchNorm
        if isinstance(module, nn.Conv2d):  # statistics other than the identity, so that both are exercised
            nn.init.kaiming_normal_(module.weight, mode="fan_in")
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
    plain.eval()
    dilated = copy.deepcopy(plain)
    assert dilate_stage(dilated) == 4  # features[14:18]'s depthwise 3x3 convolutions
    x = torch.randn(2, 96, 10, 14)
    with torch.no_grad():
        coarse, fine = plain(x), dilated(x)
    assert coarse.shape[-2:] == (5, 7) and fine.shape[-2:] == (10, 14)
    scale = coarse.std().item()
    assert scale > 0.1
    torch.testing.assert_close(fine[..., ::2, ::2], coarse, rtol=1e-4, atol=1e-4 * scale)
    assert (fine[..., 1::2, 1::2] - coarse).abs().mean() > 0.1 * scale  # and new values between them


def test_stride16_model_keeps_the_input_size_and_the_parameters():
    torch.manual_seed(0)
    plain = build_model("fcn_mobilenet_v2", variant="4s", num_classes=5, weights_backbone=None)
    torch.manual_seed(0)
    model = with_stride16(build_model)("fcn_mobilenet_v2", variant="4s", num_classes=5, weights_backbone=None)
    assert isinstance(model.upsample32to16, nn.Identity)
    kept = {k for k in plain.state_dict() if not k.startswith("upsample32to16")}
    assert kept == set(model.state_dict())
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 96))
        logits = model(torch.randn(1, 3, 70, 90))
    assert features[-1].shape[-2:] == features[-2].shape[-2:] == (4, 6)  # stride 16, as c16
    assert logits.shape == (1, 5, 70, 90)


def test_dilated_depthwise_gradients_are_right_in_bf16_channels_last():
    """torch 2.14.1's own kernel gets this weight gradient wrong on CPU; the probe's layer must not."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    layer = DilatedDepthwiseConv2d(conv, 2)
    x = torch.randn(4, 64, 24, 30).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(4, 64, 24, 30).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.backward(grad.to(out.dtype))
    assert out.is_contiguous(memory_format=torch.channels_last)
    x64 = x.detach().bfloat16().double().requires_grad_()
    w64 = layer.weight.detach().bfloat16().double().requires_grad_()
    reference = torch.nn.functional.conv2d(x64, w64, None, 1, 2, 2, 64)
    reference.backward(grad.bfloat16().double())
    torch.testing.assert_close(out.double(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())
    scale = w64.grad.abs().max().item()
    torch.testing.assert_close(layer.weight.grad.double(), w64.grad, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2 * x64.grad.abs().max().item())
