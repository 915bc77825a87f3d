"""The models the inference tests share: a tiny FCN-8s and a random-weight ResNet-18 FCN-8s (3 classes)."""
from __future__ import annotations

import pytest
import torch

from fcnseg import fcn_resnet18
from tests.conftest import tiny_fcn


@pytest.fixture(scope="module")
def model():
    return tiny_fcn("8s")


@pytest.fixture(scope="module")
def resnet_model():
    torch.manual_seed(0)
    return fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None).eval()
