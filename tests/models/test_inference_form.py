"""The inference form (BatchNorm folded, channels-last) against the model as it was built."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from fcnseg import build_model
from fcnseg.models.inference_form import fold_batchnorm, inference_form


def with_running_statistics(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so that folding them is not close to a no-op."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name,variant", [("fcn_resnet18", "8s"), ("fcn_resnet50", "8s"), ("fcn_mobilenet_v2", "8s"),
                                          ("fcn_resnet18", "4s"), ("fcn_mobilenet_v2", "4s")])
def test_inference_form_computes_the_same_logits_without_batchnorm(name, variant):
    model = with_running_statistics(build_model(name, variant=variant, num_classes=3, weights_backbone=None))
    for layer in (model.score16, model.score8, getattr(model, "score4", model.score8)):  # the skips start at zero
        nn.init.normal_(layer.weight, std=0.1)
    image = torch.randn(2, 3, 67, 93)
    with torch.no_grad():
        expected = model(image)
        fast = inference_form(model)
        got = fast(image)

    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # every BatchNorm was folded
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left as it was
    # float rounding only, grown through up to 50 layers: a wrong fold would be off by the logits' own scale
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


def test_fold_batchnorm_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_fold_batchnorm_leaves_a_batchnorm_that_follows_no_convolution():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with_running_statistics(model)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
        fold_batchnorm(model)
        got = model(x)
    assert [type(m) for m in model] == [nn.ReLU, nn.BatchNorm2d, nn.Conv2d, nn.Identity]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_module_that_is_not_an_fcn_is_left_as_it_is():
    # Registration order conv, conv, norm, norm: pairing by order would fold the wrong BatchNorm.
    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    body = with_running_statistics(Body())
    assert inference_form(body) is body
    assert isinstance(body.bn1, nn.BatchNorm2d) and isinstance(body.bn2, nn.BatchNorm2d)


def test_inference_form_keeps_the_final_upsampler_bias():
    model = with_running_statistics(build_model("fcn_resnet18", variant="16s", num_classes=3, weights_backbone=None,
                                                upsampler_bias=True))
    nn.init.normal_(model.score16.weight, std=0.1)
    with torch.no_grad():
        model.upsample_final.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))  # larger than the logits' spread
    image = torch.randn(1, 3, 67, 93)
    with torch.no_grad():
        expected = model(image)
        fast = inference_form(model)
        got = fast(image)
    torch.testing.assert_close(fast.upsample_final.bias, model.upsample_final.bias)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("name,fused", [("fcn_mobilenet_v2", 35), ("fcn_resnet18", 1)])
def test_activations_fuse_with_their_convolutions_only_where_run_once_in_order(name, fused):
    import copy

    from fcnseg.models.inference_form import ConvActivation

    model = with_running_statistics(build_model(name, variant="8s", num_classes=3, weights_backbone=None))
    folded = fold_batchnorm(copy.deepcopy(model))
    fast = inference_form(model)
    # MobileNetV2: every Conv2dNormActivation; ResNet: the stem only (its blocks reuse their ReLU
    # after the residual sum, so those stay as they are)
    fused_modules = [m for m in fast.modules() if isinstance(m, ConvActivation)]
    assert len(fused_modules) == fused
    inside = {id(m.activation) for m in fused_modules}
    left = [m for m in fast.modules() if isinstance(m, (nn.ReLU, nn.ReLU6)) and id(m) not in inside]
    assert (len(left) == 0) == (name == "fcn_mobilenet_v2")
    assert list(fast.state_dict()) == list(folded.state_dict())  # checkpoints and exports see no change


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_convolution_equals_the_convolution_then_its_activation(dtype):
    from fcnseg.models.inference_form import ConvActivation

    torch.manual_seed(0)
    for activation, groups in ((nn.ReLU6(), 1), (nn.ReLU(), 1), (nn.ReLU6(), 8)):
        conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups).to(memory_format=torch.channels_last)
        fused = ConvActivation(conv, activation)
        x = (torch.randn(2, 8, 11, 13) * 3).to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            got, expected = fused(x), activation(conv(x))
        assert got.dtype == expected.dtype == dtype
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
        torch.testing.assert_close(got.float(), expected.float(), **tolerance)
        assert got.min() >= 0 and (isinstance(activation, nn.ReLU) or got.max() <= 6)


def test_bf16_where_onednn_refuses_it_runs_the_two_modules(monkeypatch):
    """On CPUs without oneDNN's bf16 (AVX2), its fused convolution raises; torch's conv2d does not."""
    module = importlib.import_module("fcnseg.models.inference_form")  # the package exports a function of that name

    def refusing(*args):
        raise RuntimeError("mkldnn_convolution: bf16 path needs the cpu support avx512bw")

    monkeypatch.setattr(module, "native_cpu_bf16", lambda: False)
    monkeypatch.setattr(module, "_CONV_POINTWISE", refusing)
    conv = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)
    fused, x = module.ConvActivation(conv, nn.ReLU6()), torch.randn(1, 4, 9, 9).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = fused(x), nn.functional.relu6(conv(x))
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    monkeypatch.setattr(module, "native_cpu_bf16", lambda: True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="bf16 path"):
        fused(x)  # where oneDNN has bf16, the fused operation is what runs


def test_an_activation_used_twice_is_not_fused():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), relu, nn.Conv2d(4, 4, 1), relu, nn.Conv2d(4, 4, 1), nn.ReLU6())
    from fcnseg.models.inference_form import ConvActivation, fuse_activations

    fuse_activations(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, ConvActivation, nn.Identity]


def test_unfused_activations_are_plain_convolutions_then_activations_with_the_same_logits():
    import copy

    from fcnseg.models.inference_form import ConvActivation, unfuse_activations

    model = with_running_statistics(build_model("fcn_mobilenet_v2", variant="8s", num_classes=3, weights_backbone=None))
    fast = inference_form(model)
    plain = unfuse_activations(copy.deepcopy(fast))
    assert not any(isinstance(m, ConvActivation) for m in plain.modules())
    pairs = [m for m in plain.modules() if isinstance(m, nn.Sequential) and len(m) == 2
             and type(m[0]) is nn.Conv2d and type(m[1]) in (nn.ReLU, nn.ReLU6)]
    assert len(pairs) == 35  # each fused layer of the test above, as the two modules a quantizer matches
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(plain(image), fast(image), rtol=1e-5, atol=1e-5)
