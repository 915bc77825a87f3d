"""Random-weight PyTorch FCNs for the JAX backend's parity tests (skipped when JAX is not installed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("jax")
pytest.importorskip("flax")


def random_fcn(name: str = "fcn_resnet18", variant: str = "8s", *, num_classes: int = 3, seed: int = 0,
               upsampler: str = "bilinear", upsampler_bias: bool = True) -> torch.nn.Module:
    """A PyTorch FCN in eval mode with every weight random: BatchNorm statistics and affine maps too,
    and the skip scores (which start at zero) and upsamplers, so that parity tests see every layer."""
    from fcnseg.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, variant=variant, num_classes=num_classes, weights_backbone=None,
                        upsampler=upsampler, upsampler_bias=upsampler_bias)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.dtype.is_floating_point:
                continue
            if key.endswith("running_var"):
                value.uniform_(0.5, 1.5)
            elif key.endswith(("running_mean", "bias")):
                value.normal_(0.0, 0.1)
            elif key.startswith("score") or (key.endswith("weight") and value.ndim == 1):
                value.normal_(1.0 if value.ndim == 1 else 0.0, 0.1)
            elif key.startswith("upsample") and upsampler != "fixed":
                value.add_(torch.randn_like(value) * 0.01)
    return model.eval()


def to_nhwc(image: torch.Tensor) -> np.ndarray:
    return image.numpy().transpose(0, 2, 3, 1)


def assert_logits_match(jax_logits: np.ndarray, torch_logits: np.ndarray) -> None:
    """fp32 logits within 1e-4 of the largest magnitude, and >= 99.9% of the argmax labels equal."""
    assert jax_logits.shape == torch_logits.shape
    scale = np.abs(torch_logits).max()
    assert scale > 0
    error = np.abs(jax_logits - torch_logits).max() / scale
    assert error < 1e-4, f"relative error {error:.2e}"
    agree = (jax_logits.argmax(1) == torch_logits.argmax(1)).mean()
    assert agree >= 0.999, f"masks agree on {agree:.4%} of pixels"
