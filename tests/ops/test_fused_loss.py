"""The fused upsampler + cross-entropy against the unfused computation, done by torch's own layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcnseg.models import upsample as upsample_module
from fcnseg.models.upsample import TransposedConvUpsampler
from fcnseg.ops import cell_blocks, fused_loss, native
from fcnseg.ops.fused_loss import upsample_cross_entropy


def reference_loss(score, weight, target, stride, class_weights, reduction):
    """nn.ConvTranspose2d's functional form, cropped as FCN.forward crops, then F.cross_entropy."""
    logits = F.conv_transpose2d(score, weight, stride=stride, padding=stride // 2)
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
def test_fused_loss_and_gradients_equal_the_unfused_ones(monkeypatch, stride, grid, size, reduction, weighted):
    monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 7)  # several chunks, the last one partial
    torch.manual_seed(0)
    classes = 4
    up = TransposedConvUpsampler(classes, stride, "xavier")
    score = torch.randn(2, classes, *grid, dtype=torch.float64).float().requires_grad_()
    target = torch.randint(0, classes, (2, *size))
    target[0, :2] = 255  # void rows
    target[1, :, -1] = 255
    class_weights = torch.rand(classes) + 0.5 if weighted else None

    loss = upsample_cross_entropy(score, up, target, class_weights=class_weights, reduction=reduction)
    grads = torch.autograd.grad(loss * 3.0, (score, up.weight))  # the incoming gradient scales both
    expected = reference_loss(score, up.weight, target, stride, class_weights, reduction)
    expected_grads = torch.autograd.grad(expected * 3.0, (score, up.weight))

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stride,cells,length", [(2, 4, 6), (2, 4, 5), (8, 3, 13), (8, 5, 13), (32, 11, 320), (32, 13, 375)])
def test_cell_runs_cover_every_image_pixel_once(stride, cells, length):
    covered = torch.zeros(cells * stride, dtype=torch.long)  # the upsampler's canvas along one axis
    for first, stop, lo, hi in cell_blocks.cell_runs(cells, stride, length):
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
def test_fused_loss_under_native_bf16_autocast_stays_close(monkeypatch, chunks, softmax):
    monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: True)
    use_softmax(monkeypatch, softmax)
    if chunks == "several":  # GEMM chunks of 3 rows of 16 pixels, each split into softmax chunks of one row
        monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 16)
        monkeypatch.setattr(fused_loss, "PIXELS_PER_GEMM", 56)
    torch.manual_seed(1)
    up = TransposedConvUpsampler(5, 8, "xavier")
    score = torch.randn(2, 5, 3, 4, requires_grad=True)
    target = torch.randint(0, 5, (2, 24, 30))
    target[0, 3:9] = 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = upsample_cross_entropy(score, up, target)
    grads = torch.autograd.grad(loss, (score, up.weight))
    expected = reference_loss(score, up.weight, target, 8, None, "mean")
    expected_grads = torch.autograd.grad(expected, (score, up.weight))
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


@pytest.mark.parametrize("variant", ["32s", "8s"])
def test_fcn_cross_entropy_trains_the_model_as_its_forward_and_loss_do(variant):
    from fcnseg import fcn_resnet18
    from fcnseg.ops.loss import segmentation_loss
    from fcnseg.training.loss import fcn_cross_entropy

    torch.manual_seed(0)
    model = fcn_resnet18(variant=variant, num_classes=3, weights_backbone=None, upsampler="xavier").eval()
    if variant == "8s":  # the skip score layers start at zero; make them count
        for layer in (model.score16, model.score8):
            torch.nn.init.normal_(layer.weight, std=0.1)
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


@pytest.mark.parametrize("rows,row_size,chunk_size", [(10, 80, 280), (8, 80, 280), (1200, 5376, 21 * 2**17),
                                                     (7, 16, 7), (1, 5, 100), (100, 3, 299)])
def test_chunks_fit_their_buffer_and_are_as_few_as_can_be(rows, row_size, chunk_size):
    per_chunk = fused_loss._rows_per_chunk(rows, row_size, chunk_size)
    fitting = max(1, chunk_size // row_size)  # rows that fit a buffer (always at least one)
    assert 1 <= per_chunk <= fitting
    assert -(-rows // per_chunk) == -(-rows // fitting)  # no more chunks than the fewest possible


@pytest.mark.parametrize("precision", ["float32", "bf16-eager", "bf16-kernel"])
def test_fused_loss_is_exact_for_logits_far_from_zero(monkeypatch, precision):
    # Eager: chunks whose exp2 sums leave the safe range are recomputed with the max shift, the
    # others not; the kernel always shifts.
    monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 16)
    monkeypatch.setattr(fused_loss, "PIXELS_PER_GEMM", 56)
    verdicts = []
    check = fused_loss._sums_in_safe_range
    monkeypatch.setattr(fused_loss, "_sums_in_safe_range", lambda sums: verdicts.append(check(sums)) or verdicts[-1])
    if precision != "float32":
        monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: True)
        use_softmax(monkeypatch, precision.split("-")[1])
    torch.manual_seed(2)
    up = TransposedConvUpsampler(5, 8, "xavier")
    score = torch.randn(3, 5, 3, 4)
    score[0] *= 80  # logits of several hundred: exp2 overflows float32 unshifted
    score[1] = score[1] * 0.5 - 150  # every class far below zero: exp2 underflows unshifted
    score.requires_grad_()
    target = torch.randint(0, 5, (3, 24, 30))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32"):
        loss = upsample_cross_entropy(score, up, target)
    grads = torch.autograd.grad(loss, (score, up.weight))
    expected = reference_loss(score, up.weight, target, 8, None, "mean")
    expected_grads = torch.autograd.grad(expected, (score, up.weight))

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
