"""The FCN's last upsampling and its per-pixel cross-entropy in one chunked pass.

A training step spends much of its memory traffic around the full-resolution logits (and when only
the head trains, on cached body features, most of its time): the transposed convolution writes
them, the loss reads them a few times, its backward writes their gradient, and the upsampler's
backward reads it again, for 21 x H x W values per image that live only to be reduced to one number. This computes the same
loss and the same gradients chunk by chunk over the upsampler's output cells, so each chunk of
logits is made, turned into its loss and its gradient, and consumed by the two backward GEMMs while
it is still in cache. It is the "fused linear cross-entropy" of large-vocabulary language models
(Liger-Kernel, Apple's cut cross-entropy) applied to a transposed convolution; no library offers it
for this layer, so it is written here against `torch` primitives.

The gradients are computed in the forward pass (they need the logits, which are not kept) and
scaled by the incoming gradient in the backward pass, so the loss must be the last operation
before ``backward()``, as it is in a training step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fcnseg.engine import IGNORE_INDEX, segmentation_loss
from fcnseg.models.fcn import FCN, OUTPUT_STRIDE, pad_to_multiple
from fcnseg.models.upsample import TransposedConvUpsampler, low_precision_dtype, transposed_conv_as_conv_weight

# Output cells per chunk: 128 cells of a stride-32 upsampler with 21 classes are 11 MB of float32
# logits, small enough to stay in this CPU's cache, large enough for efficient GEMMs.
CELLS_PER_CHUNK = 128


def upsample_cross_entropy(
    score: torch.Tensor,
    upsampler: TransposedConvUpsampler,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``segmentation_loss(upsampler(score)[..., :H, :W], target)`` without the full-size logits.

    Args:
        score: ``(N, C, h, w)`` class scores before the last upsampling.
        upsampler: the model's learned final upsampler (stride s, so ``h * s >= H`` and
            ``w * s >= W``); its weight receives the gradient.
        target: ``(N, H, W)`` int64 class ids, ``ignore_index`` for void.
        class_weights: optional ``(C,)`` per-class weights, as ``F.cross_entropy`` takes them.
        reduction: "mean" over labelled pixels (weighted mean with class weights), or "d2l": the
            sum over images of each image's mean pixel loss.
        ignore_index: the void label.

    Returns:
        The loss, a float32 scalar; equal to the unfused computation up to float rounding.
    """
    if reduction not in ("mean", "d2l"):
        raise ValueError(f"reduction must be 'mean' or 'd2l', got {reduction!r}")
    if not upsampler.learnable:
        raise ValueError("the fused loss is for a learned upsampler; a fixed one is cheap to run as it is")
    n, c, h, w = score.shape
    if target.shape[0] != n or target.shape[1] > h * upsampler.stride or target.shape[2] > w * upsampler.stride:
        raise ValueError(f"target {tuple(target.shape)} does not fit the upsampled {n}x{h * upsampler.stride}x"
                         f"{w * upsampler.stride} scores")
    dtype = low_precision_dtype(score.device.type)
    if dtype == torch.float16:
        # The gradients are made here, before GradScaler's scale reaches them in backward: per-pixel
        # gradients of a mean over a million pixels would underflow float16, not bfloat16.
        dtype = torch.float32
    with torch.autocast(score.device.type, enabled=False):
        return _UpsampleCrossEntropy.apply(score, upsampler.weight, target, upsampler.stride, class_weights,
                                           reduction, ignore_index, dtype)


def fcn_cross_entropy(
    model: FCN,
    image: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``segmentation_loss(model(image), target)`` with the model's last upsampling fused into the loss.

    The whole model trains as it would through ``model(image)`` (same modules, same BatchNorm
    behaviour); only the final upsampler and the cross-entropy are computed by
    `upsample_cross_entropy`. A fixed final upsampler runs unfused.

    Args:
        model: an `FCN`, not wrapped (DistributedDataParallel synchronises gradients through the
            wrapper's forward call, which this bypasses).
        image: ``(N, 3, H, W)`` normalised.
        target: ``(N, H, W)`` int64.
    """
    if not model.upsample_final.learnable:
        return segmentation_loss(model(image), target, class_weights=class_weights, reduction=reduction,
                                 ignore_index=ignore_index)
    c8, c16, c32 = model.backbone(pad_to_multiple(image, OUTPUT_STRIDE))
    return upsample_cross_entropy(model.scores(c8, c16, c32), model.upsample_final, target,
                                  class_weights=class_weights, reduction=reduction, ignore_index=ignore_index)


def _class_major(matrix: torch.Tensor, c_out: int, stride: int) -> torch.Tensor:
    """Reorders `transposed_conv_as_conv_weight`'s columns from (r_y, r_x, o) to (o, r_y, r_x)."""
    s = stride
    return matrix.view(-1, s, s, c_out).permute(0, 3, 1, 2).reshape(matrix.shape[0], c_out * s * s)


class _UpsampleCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, score, weight, target, stride, class_weights, reduction, ignore_index, dtype):
        n, c, h, w = score.shape
        s, half = stride, stride // 2
        height, width = target.shape[-2:]
        matrix = _class_major(transposed_conv_as_conv_weight(weight.detach().float(), s), c, s).to(dtype)  # (4C, C*s*s)
        columns = F.unfold(score.detach().to(dtype), 2, padding=1)  # (N, 4C, cells)
        columns = columns.transpose(1, 2).reshape(-1, 4 * c)  # rows: cells (n, y, x)
        # The target on the upsampler's canvas (which starts half a stride before the image), in the
        # GEMM's column order: one row of s*s pixels (r_y, r_x) per output cell.
        canvas = torch.full((n, (h + 1) * s, (w + 1) * s), ignore_index, dtype=torch.long, device=score.device)
        canvas[:, half:half + height, half:half + width] = target
        cell_targets = canvas.view(n, h + 1, s, w + 1, s).permute(0, 1, 3, 2, 4).reshape(-1, s * s)
        labelled = cell_targets != ignore_index
        safe_targets = torch.where(labelled, cell_targets, 0)
        pixel_weights = labelled.float()
        if class_weights is not None:
            pixel_weights = pixel_weights * class_weights.float()[safe_targets]
        if reduction == "mean":
            pixel_weights = pixel_weights / pixel_weights.sum().clamp(min=1e-12)
        else:
            per_image = labelled.view(n, -1).sum(1).clamp(min=1).float()
            pixel_weights = pixel_weights / per_image.repeat_interleave((h + 1) * (w + 1)).unsqueeze(1)

        loss = torch.zeros((), dtype=torch.float64, device=score.device)
        grad_matrix = torch.zeros(matrix.shape, dtype=torch.float32, device=score.device)
        grad_columns = torch.empty(columns.shape, dtype=torch.float32, device=score.device)
        # Buffers reused by every chunk: a fresh 11 MB tensor per operation costs more in page faults
        # than the softmax itself (measured 13 ms against 4 ms per chunk here).
        rows = min(CELLS_PER_CHUNK, columns.shape[0])
        low_precision = dtype != torch.float32
        logits_buffer = torch.empty((rows, c * s * s), dtype=dtype, device=score.device)
        logits32_buffer = torch.empty_like(logits_buffer, dtype=torch.float32) if low_precision else logits_buffer
        probs_buffer = torch.empty((rows, c * s * s), dtype=torch.float32, device=score.device)
        grad_buffer = torch.empty_like(probs_buffer, dtype=dtype) if low_precision else probs_buffer
        grad_matrix_chunk = torch.empty(matrix.shape, dtype=dtype, device=score.device)
        minus_ones = torch.full((rows, 1, s * s), -1.0, device=score.device)
        for start in range(0, columns.shape[0], CELLS_PER_CHUNK):
            stop = min(start + CELLS_PER_CHUNK, columns.shape[0])
            k = stop - start
            block = columns[start:stop]
            # Columns are class-major (o, r_y, r_x), so the softmax runs over a strided class axis
            # and vectorises across a cell's s*s pixels: twice as fast here as over rows of 21.
            torch.mm(block, matrix, out=logits_buffer[:k])
            logits = logits32_buffer[:k].view(k, c, s * s)
            if low_precision:
                # Converting first: softmax(bf16, dtype=float32) measured 4x slower here than on float32.
                logits.view(k, -1).copy_(logits_buffer[:k])
            targets = safe_targets[start:stop].view(k, 1, s * s)
            weights = pixel_weights[start:stop].view(k, 1, s * s)
            # softmax (in float32) once: the loss from its target entries, the gradient from all.
            probs = probs_buffer[:k].view(k, c, s * s)
            torch.softmax(logits, 1, out=probs)
            nll = -torch.log(probs.gather(1, targets))
            underflow = ~torch.isfinite(nll) | (nll > 60)  # a target probability near float32's floor
            if bool(underflow.any()):
                exact = torch.log_softmax(logits, dim=1).gather(1, targets)
                nll = torch.where(underflow, -exact, nll)
            loss += (nll * weights).sum(dtype=torch.float64)
            # d loss / d logits = weight * (softmax - one_hot), made in place of the probabilities
            probs.scatter_add_(1, targets, minus_ones[:k])
            probs.mul_(weights)
            grad_logits = grad_buffer[:k]
            if low_precision:
                grad_logits.copy_(probs.view(k, -1))
            torch.mm(block.t(), grad_logits, out=grad_matrix_chunk)
            grad_matrix += grad_matrix_chunk  # bf16 products, summed over chunks in float32
            grad_columns[start:stop] = grad_logits @ matrix.t()
        ctx.save_for_backward(grad_matrix, grad_columns)
        ctx.geometry = (n, c, h, w, s, score.dtype, weight.dtype)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_matrix, grad_columns = ctx.saved_tensors
        n, c, h, w, s, score_dtype, weight_dtype = ctx.geometry
        grad_score = F.fold(grad_columns.view(n, -1, 4 * c).transpose(1, 2), (h, w), 2, padding=1)
        # The inverse of _class_major(transposed_conv_as_conv_weight(...)): (i, t_y, t_x, o, r_y, r_x)
        # back to (i, o, t_y, r_y, t_x, r_x), kernel halves unflipped.
        grad_weight = grad_matrix.view(c, 2, 2, c, s, s).permute(0, 3, 1, 4, 2, 5).flip(2, 4).reshape(c, c, 2 * s, 2 * s)
        return ((grad_score * grad_loss).to(score_dtype), (grad_weight * grad_loss).to(weight_dtype),
                None, None, None, None, None, None)


__all__ = ["upsample_cross_entropy", "fcn_cross_entropy"]
