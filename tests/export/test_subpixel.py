"""The sub-pixel form of the upsamplers: equal to torch's ConvTranspose2d, the FCN's logits kept, and
exported as Conv + DepthToSpace (no ConvTranspose) with onnxruntime matching PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcnseg.export.subpixel import SubpixelUpsampler, subpixel_form
from fcnseg.models.upsample import TransposedConvUpsampler
from tests.conftest import tiny_fcn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("stride", [2, 8, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_conv_transpose(stride, bias):
    torch.manual_seed(stride)
    layer = TransposedConvUpsampler(5, stride, init="xavier", bias=bias)
    x = torch.randn(2, 5, 7, 9)
    # The independent reference: torch's own transposed convolution with the same parameters.
    expected = F.conv_transpose2d(x, layer.weight, layer.bias, stride=stride, padding=stride // 2)
    got = SubpixelUpsampler(layer)(x)
    assert got.shape == expected.shape == (2, 5, 7 * stride, 9 * stride)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,upsamplers", [("8s", 3), ("4s", 4), ("2s", 5)])  # 32->16, 16->8, (8->4, 4->2,) final
def test_subpixel_form_is_a_copy_with_the_same_logits(variant, upsamplers):
    model = tiny_fcn(variant, seed=1)
    converted = subpixel_form(model)
    assert not any(isinstance(m, TransposedConvUpsampler) for m in converted.modules())
    assert sum(isinstance(m, SubpixelUpsampler) for m in converted.modules()) == upsamplers
    assert isinstance(model.upsample_final, TransposedConvUpsampler)  # the original is left as it is
    x = torch.randn(1, 3, 67, 93)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["8s", "4s"])
def test_onnx_export_has_no_conv_transpose(tmp_path, variant):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fcnseg.export.onnx import export_onnx

    path = tmp_path / "subpixel.onnx"
    report = export_onnx(subpixel_form(tiny_fcn(variant, seed=1)), path, exporter="legacy", sizes=[(64, 96), (67, 93)])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "DepthToSpace" in ops and "ConvTranspose" not in ops
    assert report["verified"] and report["max_abs_diff"] < 1e-4
