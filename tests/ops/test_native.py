"""The compiled softmax kernel against a float64 softmax cross-entropy, and its fallbacks."""
from __future__ import annotations

import math

import pytest
import torch

from fcnseg.ops import native


def reference(logits_base2: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor):
    """Per-row loss in bits and d loss / d logits, in float64 with torch's own softmax."""
    x = logits_base2.double() * math.log(2)  # natural-log logits
    k, c, _ = x.shape
    log_p = torch.log_softmax(x, dim=1)
    labelled = (classes >= 0) & (classes < c)
    safe = torch.where(labelled, classes, 0).long()
    one_hot = torch.nn.functional.one_hot(safe, c).permute(0, 2, 1).double() * labelled.unsqueeze(1)
    w = weights.double()
    grad = w.unsqueeze(1) * (log_p.exp() - one_hot)
    row_losses = -(log_p.gather(1, safe.unsqueeze(1)).squeeze(1) * w * labelled).sum(1) / math.log(2)
    return row_losses, grad


@pytest.fixture
def kernel():
    reason = native.native_unavailable_reason()
    if reason is not None:
        pytest.skip(f"compiled softmax kernel: {reason}")
    module = native.softmax_grad_kernel()
    assert module is not None, "the kernel could be built here but was not"
    return module


@pytest.mark.parametrize("classes,pixels", [(21, 256), (21, 37), (3, 5), (64, 16)])
def test_kernel_matches_float64_softmax_cross_entropy(kernel, classes, pixels):
    torch.manual_seed(classes + pixels)
    k = 7
    logits = (torch.randn(k, classes, pixels) * 6).bfloat16()
    logits[0, 0, 0] = 300.0  # far from zero: the kernel shifts by the largest logit
    logits[1, :, 1] = -400.0
    targets = torch.randint(0, classes, (k, pixels), dtype=torch.int32)
    weights = torch.rand(k, pixels) * 1e-3
    targets[2, :3], weights[2, :3] = 255, 0.0  # void pixels: no one-hot, no weight
    expected_losses, expected_grad = reference(logits, targets, weights)

    grad = logits.clone()
    row_losses = torch.empty(k, dtype=torch.float64)
    kernel.softmax_cross_entropy_grad_(grad, targets, weights, row_losses)

    torch.testing.assert_close(row_losses, expected_losses, rtol=1e-5, atol=1e-9)
    # bf16 rounding of the stored gradient (8 bits), nothing more
    torch.testing.assert_close(grad.double(), expected_grad, rtol=2**-8, atol=1e-12)


def test_kernel_propagates_nan(kernel):
    logits = torch.zeros(1, 3, 4, dtype=torch.bfloat16)
    logits[0, 1, 2] = float("nan")
    row_losses = torch.empty(1, dtype=torch.float64)
    kernel.softmax_cross_entropy_grad_(logits, torch.zeros(1, 4, dtype=torch.int32), torch.ones(1, 4), row_losses)
    assert torch.isnan(row_losses).all() and torch.isnan(logits[0, :, 2]).all()
    assert not torch.isnan(logits[0, :, 0]).any()


def test_kernel_refuses_wrong_inputs(kernel):
    logits = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    classes, weights, losses = torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, 4), torch.empty(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.softmax_cross_entropy_grad_(logits.float(), classes, weights, losses)
    with pytest.raises(RuntimeError, match="int32"):
        kernel.softmax_cross_entropy_grad_(logits, classes.long(), weights, losses)
    with pytest.raises(RuntimeError, match=r"\(K, P\)"):
        kernel.softmax_cross_entropy_grad_(logits, classes[:, :3], weights, losses)
    with pytest.raises(RuntimeError, match="64 classes"):
        kernel.softmax_cross_entropy_grad_(torch.zeros(2, 65, 4, dtype=torch.bfloat16), classes, weights, losses)


def test_unavailable_reasons_name_what_is_missing(monkeypatch):
    monkeypatch.setenv("FCNSEG_NATIVE", "0")
    assert "FCNSEG_NATIVE=0" in native.native_unavailable_reason()
    monkeypatch.delenv("FCNSEG_NATIVE")
    monkeypatch.setattr(native.platform, "machine", lambda: "arm64")
    assert "x86-64" in native.native_unavailable_reason()
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert "avx512_bf16" in native.native_unavailable_reason()
    monkeypatch.setattr(native, "cpu_flags", lambda: native.REQUIRED_CPU_FLAGS)
    monkeypatch.setenv("CXX", "no-such-compiler-fcnseg")
    assert "C++ compiler" in native.native_unavailable_reason()


def test_a_failed_build_warns_and_falls_back_to_the_eager_path(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(native, "native_unavailable_reason", lambda: None)

    def broken_build(**kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(cpp_extension, "load", broken_build)
    native.softmax_grad_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiler exploded"):
            assert native.softmax_grad_kernel() is None
    finally:
        native.softmax_grad_kernel.cache_clear()


def test_no_kernel_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("FCNSEG_NATIVE", "0")
    native.softmax_grad_kernel.cache_clear()
    try:
        assert native.softmax_grad_kernel() is None
    finally:
        native.softmax_grad_kernel.cache_clear()
