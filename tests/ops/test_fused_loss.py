"""The fused upsampler + cross-entropy against the unfused computation, done by torch's own layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcnseg.models import upsample as upsample_module
from fcnseg.models.upsample import TransposedConvUpsampler
from fcnseg.ops import cell_blocks, chunk_softmax, fused_loss, native
from fcnseg.ops.fused_loss import upsample_cross_entropy


def reference_loss(score, weight, target, stride, class_weights, reduction, bias=None):
    """nn.ConvTranspose2d's functional form, cropped as FCN.forward crops, then F.cross_entropy."""
    logits = F.conv_transpose2d(score, weight, bias, stride=stride, padding=stride // 2)
    logits = logits[..., : target.shape[1], : target.shape[2]]
    if reduction == "mean":
        return F.cross_entropy(logits, target, weight=class_weights, ignore_index=255)
    per_pixel = F.cross_entropy(logits, target, weight=class_weights, ignore_index=255, reduction="none")
    labelled = (target != 255).flatten(1).sum(1).clamp(min=1)
    return (per_pixel.flatten(1).sum(1) / labelled).sum()


@pytest.mark.parametrize("stride,grid,size", [(2, (3, 4), (6, 7)), (8, (2, 3), (13, 24)), (8, (4, 3), (13, 24)),
                                              (32, (2, 2), (50, 64))])
@pytest.mark.parametrize("reduction", ["mean", "d2l"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_fused_loss_and_gradients_equal_the_unfused_ones(monkeypatch, stride, grid, size, reduction, weighted, biased):
    monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 7)  # several chunks, the last one partial
    torch.manual_seed(0)
    classes = 4
    up = TransposedConvUpsampler(classes, stride, "xavier", bias=biased)
    if biased:  # larger than its start, so that a bias left out (or its gradient) shows
        up.bias.data.copy_(torch.tensor([1.0, -1.5, 0.5, 2.0]))
    score = torch.randn(2, classes, *grid, dtype=torch.float64).float().requires_grad_()
    target = torch.randint(0, classes, (2, *size))
    target[0, :2] = 255  # void rows
    target[1, :, -1] = 255
    class_weights = torch.rand(classes) + 0.5 if weighted else None

    learned = (score, up.weight) + ((up.bias,) if biased else ())
    loss = upsample_cross_entropy(score, up, target, class_weights=class_weights, reduction=reduction)
    grads = torch.autograd.grad(loss * 3.0, learned)  # the incoming gradient scales them all
    expected = reference_loss(score, up.weight, target, stride, class_weights, reduction, up.bias)
    expected_grads = torch.autograd.grad(expected * 3.0, learned)

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("whole_cells", [None, False, True])
@pytest.mark.parametrize("stride,cells,length", [(2, 4, 6), (2, 4, 5), (4, 6, 19), (8, 3, 13), (8, 5, 13), (32, 11, 320),
                                                 (32, 13, 375)])
def test_cell_runs_cover_every_image_pixel_once(stride, cells, length, whole_cells):
    covered = torch.zeros(cells * stride, dtype=torch.long)  # the upsampler's canvas along one axis
    runs = cell_blocks.cell_runs(cells, stride, length, whole_cells=whole_cells)
    widest = max(hi - lo for _, _, lo, hi in runs)
    assert widest == (stride if whole_cells or (whole_cells is None and stride < 8) else stride // 2)
    for first, stop, lo, hi in runs:
        for m in range(first, stop):
            covered[m * stride + lo:m * stride + hi] += 1
    half = stride // 2
    expected = torch.zeros_like(covered)
    expected[half:half + length] = 1  # the image starts half a stride into the canvas
    assert torch.equal(covered, expected)


def test_fused_loss_ignores_an_all_void_image_in_d2l_reduction():
    up = TransposedConvUpsampler(3, 4)
    score = torch.randn(2, 3, 2, 2, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[1] = 255
    loss = upsample_cross_entropy(score, up, target, reduction="d2l")
    torch.testing.assert_close(loss, reference_loss(score, up.weight, target, 4, None, "d2l"))


def use_softmax(monkeypatch, softmax: str) -> None:
    """Runs the bf16 path's softmax as the compiled kernel (skipping where it cannot be built) or eagerly."""
    if softmax == "eager":
        monkeypatch.setattr(fused_loss, "softmax_grad_kernel", lambda: None)
    elif native.native_unavailable_reason() is not None:
        pytest.skip(f"compiled softmax kernel: {native.native_unavailable_reason()}")


@pytest.mark.parametrize("softmax", ["kernel", "eager"])
@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("biased", [False, True])
def test_fused_loss_under_native_bf16_autocast_stays_close(monkeypatch, chunks, softmax, biased):
    monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: True)
    use_softmax(monkeypatch, softmax)
    if chunks == "several":  # GEMM chunks of 3 rows of 16 pixels, each split into softmax chunks of one row
        monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 16)
        monkeypatch.setattr(fused_loss, "PIXELS_PER_GEMM", 56)
    torch.manual_seed(1)
    up = TransposedConvUpsampler(5, 8, "xavier", bias=biased)
    if biased:
        up.bias.data.copy_(torch.tensor([1.0, -1.5, 0.5, 2.0, -0.5]))
    score = torch.randn(2, 5, 3, 4, requires_grad=True)
    target = torch.randint(0, 5, (2, 24, 30))
    target[0, 3:9] = 255
    learned = (score, up.weight) + ((up.bias,) if biased else ())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = upsample_cross_entropy(score, up, target)
    grads = torch.autograd.grad(loss, learned)
    expected = reference_loss(score, up.weight, target, 8, None, "mean", up.bias)
    expected_grads = torch.autograd.grad(expected, learned)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    for got, want in zip(grads, expected_grads):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_fused_loss_refuses_what_it_cannot_compute():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="learned upsampler"):
        upsample_cross_entropy(torch.randn(1, 3, 2, 2), TransposedConvUpsampler(3, 4, "fixed"), target)
    with pytest.raises(ValueError, match="does not fit"):
        upsample_cross_entropy(torch.randn(1, 3, 1, 1), TransposedConvUpsampler(3, 4), target)
    with pytest.raises(ValueError, match="reduction"):
        upsample_cross_entropy(torch.randn(1, 3, 2, 2), TransposedConvUpsampler(3, 4), target, reduction="sum")


@pytest.mark.parametrize("variant,biased", [("32s", False), ("8s", False), ("32s", True), ("8s", True), ("4s", False),
                                            ("4s", True), ("2s", True)])
def test_fcn_cross_entropy_trains_the_model_as_its_forward_and_loss_do(variant, biased):
    from fcnseg import fcn_resnet18
    from fcnseg.ops.loss import segmentation_loss
    from fcnseg.training.loss import fcn_cross_entropy

    torch.manual_seed(0)
    model = fcn_resnet18(variant=variant, num_classes=3, weights_backbone=None, upsampler="xavier",
                         upsampler_bias=biased).eval()
    if biased:
        model.upsample_final.bias.data.copy_(torch.tensor([0.5, -1.0, 1.5]))
    for name in ("score16", "score8", "score4", "score2"):  # the skip score layers start at zero; make them count
        if hasattr(model, name):
            torch.nn.init.normal_(getattr(model, name).weight, std=0.1)
    if variant == "4s":  # the final upsampler is the stride-4 one (kernel 8) the fused loss computes
        assert (model.upsample_final.stride, model.upsample_final.kernel_size) == (4, 8)
    image = torch.randn(2, 3, 67, 93)  # not a multiple of 32: padded, then cropped back
    target = torch.randint(0, 3, (2, 67, 93))
    target[:, :5] = 255
    params = [p for p in model.parameters() if p.requires_grad]

    fused = fcn_cross_entropy(model, image, target, reduction="d2l")
    fused_grads = torch.autograd.grad(fused, params)
    plain = segmentation_loss(model(image), target, reduction="d2l")
    plain_grads = torch.autograd.grad(plain, params)

    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("softmax", ["kernel", "eager"])
@pytest.mark.parametrize("reduction", ["mean", "d2l"])
def test_fused_loss_with_bias_and_class_weights_under_native_bf16_autocast(monkeypatch, softmax, reduction):
    monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 16)
    monkeypatch.setattr(fused_loss, "PIXELS_PER_GEMM", 56)
    use_softmax(monkeypatch, softmax)
    torch.manual_seed(4)
    up = TransposedConvUpsampler(4, 32, "xavier", bias=True)
    up.bias.data.copy_(torch.tensor([-1.0, 2.0, 0.5, 1.5]))
    score = torch.randn(2, 4, 2, 3, requires_grad=True)
    target = torch.randint(0, 4, (2, 50, 77))
    target[1, 10:30] = 255
    class_weights = torch.tensor([0.5, 1.0, 2.0, 1.5])
    learned = (score, up.weight, up.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = upsample_cross_entropy(score, up, target, class_weights=class_weights, reduction=reduction)
    grads = torch.autograd.grad(loss, learned)
    expected = reference_loss(score, up.weight, target, 32, class_weights, reduction, up.bias)
    expected_grads = torch.autograd.grad(expected, learned)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    for got, want in zip(grads, expected_grads):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    torch.testing.assert_close(grads[2], expected_grads[2], rtol=3e-2, atol=3e-2 * expected_grads[2].abs().max().item())


@pytest.mark.parametrize("precision", ["float32", "bf16-eager", "bf16-kernel"])
def test_fused_loss_is_exact_for_logits_far_from_zero(monkeypatch, precision):
    # Eager: chunks whose exp2 sums leave the safe range are recomputed with the max shift, the
    # others not; the kernel always shifts.
    monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 16)
    monkeypatch.setattr(fused_loss, "PIXELS_PER_GEMM", 56)
    verdicts = []
    check = chunk_softmax._sums_in_safe_range
    monkeypatch.setattr(chunk_softmax, "_sums_in_safe_range", lambda sums: verdicts.append(check(sums)) or verdicts[-1])
    if precision != "float32":
        monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: True)
        use_softmax(monkeypatch, precision.split("-")[1])
    torch.manual_seed(2)
    up = TransposedConvUpsampler(5, 8, "xavier", bias=True)  # the recomputed chunks add it too
    up.bias.data.copy_(torch.tensor([3.0, -2.0, 1.0, 0.0, -4.0]))
    score = torch.randn(3, 5, 3, 4)
    score[0] *= 80  # logits of several hundred: exp2 overflows float32 unshifted
    score[1] = score[1] * 0.5 - 150  # every class far below zero: exp2 underflows unshifted
    score.requires_grad_()
    target = torch.randint(0, 5, (3, 24, 30))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32"):
        loss = upsample_cross_entropy(score, up, target)
    grads = torch.autograd.grad(loss, (score, up.weight, up.bias))
    expected = reference_loss(score, up.weight, target, 8, None, "mean", up.bias)
    expected_grads = torch.autograd.grad(expected, (score, up.weight, up.bias))

    assert (False in verdicts and True in verdicts) if precision != "bf16-kernel" else not verdicts
    assert torch.isfinite(loss)
    if precision == "float32":
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    else:
        torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
        for got, want in zip(grads, expected_grads):
            assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_fused_loss_is_nan_when_a_score_is():
    up = TransposedConvUpsampler(3, 4)
    score = torch.randn(1, 3, 2, 2)
    score[0, 1, 0, 0] = float("nan")
    loss = upsample_cross_entropy(score.requires_grad_(), up, torch.zeros(1, 8, 8, dtype=torch.long))
    assert torch.isnan(loss)


def test_to_channels_last_keeps_the_fused_upsampler_kernel_contiguous():
    from fcnseg import fcn_resnet18
    from fcnseg.models.layout import to_channels_last

    model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None)
    wrapper = torch.nn.ModuleDict({"fcn": model})  # found inside other modules too
    assert to_channels_last(wrapper) is wrapper
    assert model.upsample_final.weight.is_contiguous()
    skip_upsampler = model.upsample32to16.weight  # not fused: channels-last like the rest
    assert skip_upsampler.is_contiguous(memory_format=torch.channels_last) and not skip_upsampler.is_contiguous()
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                         and not m.weight.is_contiguous() for m in convs)


@pytest.mark.parametrize("variant", ["32s", "16s"])
def test_cached_head_loss_with_bias_equals_its_forward_and_loss(variant):
    from fcnseg import fcn_resnet18
    from fcnseg.ops.loss import segmentation_loss
    from fcnseg.training.cached_head import CachedFeatureHead, pack_features

    torch.manual_seed(5)
    model = fcn_resnet18(variant=variant, num_classes=3, weights_backbone=None, upsampler_bias=True).eval()
    model.upsample_final.bias.data.copy_(torch.tensor([1.0, -0.5, 2.0]))
    with torch.no_grad():
        packed = pack_features(model.backbone(torch.randn(2, 3, 64, 96)), variant)
    head = CachedFeatureHead(model, (61, 90))
    target = torch.randint(0, 3, (2, 61, 90))
    params = [model.score32.weight, model.upsample_final.weight, model.upsample_final.bias]
    fused = head.loss(packed, target, reduction="d2l")
    plain = segmentation_loss(head(packed), target, reduction="d2l")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_to_channels_last_keeps_the_final_upsampler_bias():
    from fcnseg import fcn_resnet18
    from fcnseg.models.layout import to_channels_last

    model = fcn_resnet18(variant="32s", num_classes=3, weights_backbone=None, upsampler_bias=True).eval()
    bias = model.upsample_final.bias
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
        expected = model(image)
        to_channels_last(model)
        got = model(image)
    assert model.upsample_final.bias is bias and model.upsample_final.weight.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
