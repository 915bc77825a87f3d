"""Loading ImageNet bodies: torchvision state dicts strictly and exactly; clear refusals."""
from __future__ import annotations

import socket

import pytest
import torch
import torchvision

from fcnseg import WeightsError, fcn_mobilenet_v2, fcn_resnet18
from fcnseg.models.backbones import Backbone, build_backbone
from tests.conftest import require_shared  # noqa: E402  (importlib mode: tests is a namespace)


def test_resnet_state_dict_from_torchvision_loads_exactly(tmp_path):
    net = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    model = fcn_resnet18(weights_backbone=path, num_classes=3).eval()
    torch.testing.assert_close(model.backbone.stage8[0].weight, net.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.stage32[1].bn2.running_var, net.layer4[1].bn2.running_var, rtol=0, atol=0)
    # same features as torchvision's own forward up to layer4
    x = torch.randn(1, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        tv = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        ours = model.backbone(x)[-1]
    torch.testing.assert_close(ours, tv)


def test_mismatched_file_is_refused_naming_keys(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        fcn_resnet18(weights_backbone=path)
    assert "layer1.0.conv1.weight" in str(info.value) and "extra.weight" in str(info.value)
    # a resnet34 file into resnet18: missing/unexpected keys, never half-loaded
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="unexpected"):
        fcn_resnet18(weights_backbone=path)


def test_shape_mismatch_is_refused(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="conv1.weight"):
        fcn_resnet18(weights_backbone=tmp_path / "shape.pth")


def test_file_with_code_or_garbage_is_refused(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        fcn_resnet18(weights_backbone=tmp_path / "garbage.pth")
    with pytest.raises(WeightsError, match="neither"):
        fcn_resnet18(weights_backbone=tmp_path / "missing.pth")


def test_real_mobilenet_v2_imagenet_file_loads_strictly_and_exactly():
    path = require_shared("weights/mobilenet_v2_imagenet_features.pth")
    state = torch.load(path, weights_only=True)
    model = fcn_mobilenet_v2(variant="8s", weights_backbone=path, num_classes=11).eval()
    features = torchvision.models.mobilenet_v2(weights=None).features
    features.load_state_dict(state, strict=True)
    features.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x)[-1], features(x))
    assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in model.backbone.state_dict().values())


def test_offline_default_weights_fail_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise socket.gaierror("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as info:
        build_backbone("resnet18", "DEFAULT")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "--weights-backbone" in message and str(tmp_path) in message


def test_random_init_when_none():
    a, b = Backbone("resnet18"), build_backbone("resnet18", None)
    assert a.stage8[0].weight.shape == b.stage8[0].weight.shape
