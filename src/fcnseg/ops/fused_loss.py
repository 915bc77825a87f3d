"""The FCN's last upsampling and its per-pixel cross-entropy in one chunked pass.

A training step spends much of its memory traffic around the full-resolution logits (and when only
the head trains, on cached body features, most of its time): the transposed convolution writes
them, the loss reads them a few times, its backward writes their gradient, and the upsampler's
backward reads it again, for 21 x H x W values per image that live only to be reduced to one number. This computes the same
loss and the same gradients chunk by chunk over the upsampler's output cells, so each chunk of
logits is made, turned into its loss and its gradient, and consumed by the two backward GEMMs while
it is still in cache; and only for pixels inside the image (the upsampler's border cells lie half
outside it), which an unfused ConvTranspose2d computes and the crop then discards. It is the "fused linear cross-entropy" of large-vocabulary language models
(Liger-Kernel, Apple's cut cross-entropy) applied to a transposed convolution; no library offers it
for this layer, so it is written here against `torch` primitives.

The gradients are computed in the forward pass (they need the logits, which are not kept) and
scaled by the incoming gradient in the backward pass, so the loss must be the last operation
before ``backward()``, as it is in a training step.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from fcnseg.constants import IGNORE_INDEX
from fcnseg.models.upsample import TransposedConvUpsampler, low_precision_dtype
from fcnseg.ops.native import softmax_grad_kernel

# Pixels per chunk: 2**17 pixels of 21 classes are 11 MB of float32 logits, small enough to stay in
# this CPU's cache, large enough for efficient GEMMs.
PIXELS_PER_CHUNK = 2**17
# Pixels per GEMM in low precision: 2**19 pixels of 21 classes are 22 MB of bf16 logits, within
# this CPU's 32 MB L3 cache.
PIXELS_PER_GEMM = 2**19
_LOG2_E = 1 / math.log(2)
_TAPS = ((0, 0), (0, 1), (1, 0), (1, 1))
# Sums of unshifted exp2 within which the softmax is computed without the max shift.
_SAFE_SUM_MIN, _SAFE_SUM_MAX = 2.0**-64, 2.0**64


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


def _cell_runs(cells: int, stride: int, length: int) -> list[tuple[int, int, int, int]]:
    """The upsampler's output cells along one axis, as runs of half-cells that overlap the image alike.

    Cell ``m`` covers canvas positions ``m*s .. m*s + s - 1``; the image covers ``s/2 .. s/2 +
    length - 1`` of the canvas (the upsampler's output starts half a stride before the image). So
    the first and last cells lie half outside it, and the cells of a padded input's margin wholly:
    their pixels are never labelled and are not computed (at 320x480 that is 15% of the work).
    Each half of a cell is a run of its own, so that every cell of a run shares its in-image pixels
    (one GEMM per run) and an image of whole strides needs only two runs per axis; half-cells also
    make GEMMs of a shape that measured 30% faster here than whole cells.

    Returns:
        ``(first_cell, stop_cell, lo, hi)`` per run: the cells ``first_cell .. stop_cell - 1`` whose
        pixels ``lo .. hi - 1`` (offsets within a cell) lie in the image.
    """
    runs: list[tuple[int, int, int, int]] = []
    half = stride // 2
    for part in (0, 1):
        for m in range(cells):
            lo = max(m * stride + part * half, half) - m * stride
            hi = min(m * stride + (part + 1) * half, half + length) - m * stride
            if hi <= lo:
                continue
            if runs and runs[-1][1] == m and runs[-1][2:] == (lo, hi):
                runs[-1] = (runs[-1][0], m + 1, lo, hi)
            else:
                runs.append((m, m + 1, lo, hi))
    return runs


def _run_pixels(image: torch.Tensor, runs: tuple[tuple[int, int, int, int], ...], stride: int) -> torch.Tensor:
    """The pixels of ``image`` ``(N, H, W)`` that one ``_cell_runs`` run per axis covers, ``(cells, pixels)``.

    Rows are the run's cells ``(n, y, x)``, columns their in-image pixels ``(r_y, r_x)``; read
    through a strided view of the image, which a run lies in by construction (no padded canvas).
    """
    (y_first, y_stop, y_lo, y_hi), (x_first, x_stop, x_lo, x_hi) = runs
    n, height, width = image.shape
    half = stride // 2
    start = (y_first * stride + y_lo - half) * width + x_first * stride + x_lo - half
    view = image.as_strided((n, y_stop - y_first, y_hi - y_lo, x_stop - x_first, x_hi - x_lo),
                            (height * width, stride * width, width, stride, 1), image.storage_offset() + start)
    return view.permute(0, 1, 3, 2, 4).reshape(-1, (y_hi - y_lo) * (x_hi - x_lo))


def _sums_in_safe_range(sums: torch.Tensor) -> bool:
    """Whether unshifted exp2 sums allow an exact-to-rounding softmax and loss (False for NaN).

    Below 2**-64 a pixel's largest exp2 is close enough to float32's subnormals to lose digits;
    above 2**64 a pixel weight divided by the sum (down to about 2**-40) may become subnormal.
    """
    smallest, largest = sums.aminmax()
    return bool(smallest >= _SAFE_SUM_MIN) and bool(largest <= _SAFE_SUM_MAX)


def _softmax_grad_(
    chunk: torch.Tensor,
    work: torch.Tensor | None,
    at_target: torch.Tensor,
    weights: torch.Tensor,
    sums: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    shift_first: bool,
    recompute: Callable[[], object],
) -> None:
    """Turns one chunk of base-2 logits ``(k, C, P)`` into d loss / d logits, in place, eagerly.

    ``work`` is a float32 buffer for low-precision logits (the softmax on bf16 measured 4x slower
    here), None when ``chunk`` is float32 itself. Fills ``sums`` (each pixel's sum of exp2) and
    ``target_logits`` (shifted alike) for the loss. ``at_target``: each pixel's target position in
    the flat chunk.

    The softmax is shift-invariant; shifting by each pixel's largest logit only keeps exp2 in
    float32's range, at two of the softmax's eight passes (6% of a cached step here). Without
    ``shift_first`` it is skipped, and the chunk recomputed (``recompute``, for a float32 chunk)
    and shifted only when the sums leave a range where nothing overflows or loses precision.
    """
    k, c, pixels = chunk.shape
    logits = chunk if work is None else work.view(k, c, pixels).copy_(chunk)
    flat_logits = logits.view(-1)
    # Written out rather than torch.softmax and gather/scatter along dim 1, which measured 2-3x
    # slower on these shapes.
    torch.index_select(flat_logits, 0, at_target, out=target_logits.view(-1))
    shift = shift_first
    if not shift_first:
        logits.exp2_()
        torch.sum(logits, 1, out=sums)
        if not _sums_in_safe_range(sums):
            if work is None:
                recompute()
            else:
                logits.copy_(chunk)
            shift = True
    if shift:
        largest = logits.amax(1, keepdim=True)
        logits.sub_(largest)
        target_logits.sub_(largest.view(k, pixels))
        logits.exp2_()
        torch.sum(logits, 1, out=sums)
    # d loss / d logits = weight * (softmax - one_hot)
    logits.mul_((weights / sums).unsqueeze(1))
    flat_logits.index_add_(0, at_target, weights.reshape(-1), alpha=-1)
    if work is not None:
        chunk.copy_(logits)


def _rows_per_chunk(rows: int, row_size: int, chunk_size: int) -> int:
    """Rows per chunk for chunks of at most ``chunk_size`` values (and one row at least), as equal as can be."""
    chunks = math.ceil(rows / max(1, chunk_size // row_size))
    return math.ceil(rows / chunks)


class _UpsampleCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, score, weight, target, stride, class_weights, reduction, ignore_index, dtype):
        n, c, h, w = score.shape
        s = stride
        height, width = target.shape[-2:]
        device = score.device
        low_precision = dtype != torch.float32
        # As `transposed_conv_as_conv_weight` explains, output cell m takes input m through kernel
        # rows 0..s-1 and input m-1 through rows s..2s-1: the kernel half k_y = 1 - t_y serves
        # F.unfold's tap t_y of a 2x2 neighbourhood (columns likewise). Axes (i, o, k_y, r_y, k_x, r_x).
        kernel = weight.detach().view(c, c, 2, s, 2, s)
        # Rows: one per output cell (y, x), its 2x2 neighbourhood of scores: (N, h+1, w+1, 4C).
        neighbourhoods = F.unfold(score.detach().float(), 2, padding=1).view(n, 4 * c, h + 1, w + 1).permute(0, 2, 3, 1)
        columns = neighbourhoods.to(dtype)
        # The forward GEMM makes the logits in base 2, for exp2 (1.7x faster here than exp): its rows
        # are scaled, a tenth of the values of the upsampler's matrix at 320x480.
        columns_base2 = (neighbourhoods * _LOG2_E).to(dtype)

        # On CPUs with AVX-512 and native bf16, a compiled kernel does the whole softmax in one pass.
        softmax_kernel = softmax_grad_kernel() if device.type == "cpu" and dtype == torch.bfloat16 else None
        labelled = target != ignore_index
        # int32 positions: index_select and index_add_ take them, with half the memory traffic. Void
        # pixels weigh 0 but must still index a class, except in the kernel, which never indexes.
        safe_targets = target.to(torch.int32)
        if softmax_kernel is None or class_weights is not None:
            safe_targets = torch.where(labelled, safe_targets, 0)
        pixel_weights = labelled_float = labelled.float()
        if class_weights is not None:
            pixel_weights = pixel_weights * class_weights.float()[safe_targets.long()]
        if reduction == "mean":
            pixel_weights = pixel_weights / pixel_weights.sum().clamp(min=1e-12)
        else:
            pixel_weights = pixel_weights / labelled_float.flatten(1).sum(1).clamp(min=1).view(n, 1, 1)
        safe_targets, pixel_weights = safe_targets.contiguous(), pixel_weights.contiguous()

        loss = torch.zeros((), dtype=torch.float64, device=device)
        grad_kernel = torch.zeros(kernel.shape, dtype=torch.float32, device=device)
        grad_columns = torch.zeros((n, h + 1, w + 1, 4 * c), dtype=torch.float32, device=device)
        # Buffers, reused: a fresh 11 MB tensor per operation costs more in page faults than the
        # softmax itself (measured 13 ms against 4 ms per chunk). In low precision the GEMMs run
        # over larger chunks than the float32 softmax: fewer, larger products, and the weight's
        # gradient summed once per GEMM chunk (6% faster per step here); in float32 the softmax
        # works in place on the GEMM's output, which must then stay in cache.
        softmax_size = max(PIXELS_PER_CHUNK, s * s // 4) * c
        gemm_size = max(PIXELS_PER_GEMM * c, softmax_size) if low_precision else softmax_size
        logits_buffer = torch.empty(softmax_size, dtype=torch.float32, device=device)
        low_buffer = torch.empty(gemm_size, dtype=dtype, device=device) if low_precision else None
        # On CPU the eager softmax first tries without its max shift (see `_softmax_grad_`); elsewhere
        # checking the sums would synchronise with the device once per chunk, which costs more.
        skip_shift = device.type == "cpu"
        for y_first, y_stop, y_lo, y_hi in _cell_runs(h + 1, s, height):
            for x_first, x_stop, x_lo, x_hi in _cell_runs(w + 1, s, width):
                pixels = (y_hi - y_lo) * (x_hi - x_lo)
                # (cells, 4C) rows (i, t_y, t_x), (C, pixels) columns (o, r_y, r_x): only the pixels
                # of these cells in the image. Class-major columns let every step of the softmax
                # below run over a strided class axis and vectorise across pixels.
                block_columns = columns[:, y_first:y_stop, x_first:x_stop].reshape(-1, 4 * c)
                block_columns_base2 = columns_base2[:, y_first:y_stop, x_first:x_stop].reshape(-1, 4 * c)
                block_matrix = torch.empty((c, 2, 2, c, y_hi - y_lo, x_hi - x_lo), dtype=dtype, device=device)
                for t_y, t_x in _TAPS:
                    block_matrix[:, t_y, t_x] = kernel[:, :, 1 - t_y, y_lo:y_hi, 1 - t_x, x_lo:x_hi]  # (i, o, r_y, r_x)
                block_matrix = block_matrix.view(4 * c, c * pixels)
                runs = ((y_first, y_stop, y_lo, y_hi), (x_first, x_stop, x_lo, x_hi))
                # contiguous, as the kernel requires: reshape returns a strided view for a few shapes
                block_classes = _run_pixels(safe_targets, runs, s).contiguous()
                block_weights = _run_pixels(pixel_weights, runs, s).contiguous()
                # The weight's gradient as the faster GEMM makes it here: (4C, C * pixels) in bf16,
                # transposed (C * pixels, 4C) in float32 (1.4-1.7x faster than the other way round).
                # With one GEMM chunk, the products are the block's gradients as they come.
                block_grad_matrix = None
                total_rows = block_columns.shape[0]
                gemm_rows = _rows_per_chunk(total_rows, c * pixels, gemm_size)
                single_gemm = gemm_rows >= total_rows
                block_grad_columns = None if single_gemm else torch.empty(
                    block_columns.shape, dtype=torch.float32, device=device)
                if softmax_kernel is None:
                    softmax_rows = _rows_per_chunk(gemm_rows, c * pixels, softmax_size)
                    # Each pixel's target logit: its flat position in a chunk, less the row's offset.
                    block_targets = block_classes * pixels + torch.arange(pixels, dtype=torch.int32, device=device)
                    row_offsets = torch.arange(softmax_rows, dtype=torch.int32, device=device).unsqueeze(1) * (c * pixels)
                    # Each pixel's exp2 sum and target logit, kept for the loss, computed once per block.
                    block_sums = torch.empty((total_rows, pixels), dtype=torch.float32, device=device)
                    block_target_logits = torch.empty((total_rows, pixels), dtype=torch.float32, device=device)
                else:
                    block_row_losses = torch.empty(total_rows, dtype=torch.float64, device=device)
                for gemm_start in range(0, total_rows, gemm_rows):
                    gemm_stop = min(gemm_start + gemm_rows, total_rows)
                    rows = block_columns[gemm_start:gemm_stop]
                    gemm_logits = (low_buffer if low_precision else logits_buffer)[:rows.shape[0] * c * pixels]
                    torch.mm(block_columns_base2[gemm_start:gemm_stop], block_matrix, out=gemm_logits.view(-1, c * pixels))
                    if softmax_kernel is not None:  # one pass, in place, over the whole GEMM chunk
                        softmax_kernel.softmax_cross_entropy_grad_(
                            gemm_logits.view(-1, c, pixels), block_classes[gemm_start:gemm_stop],
                            block_weights[gemm_start:gemm_stop], block_row_losses[gemm_start:gemm_stop])
                    else:
                        for start in range(gemm_start, gemm_stop, softmax_rows):
                            stop = min(start + softmax_rows, gemm_stop)
                            k = stop - start
                            chunk = gemm_logits[(start - gemm_start) * c * pixels:(stop - gemm_start) * c * pixels]
                            chunk = chunk.view(k, c, pixels)
                            _softmax_grad_(
                                chunk, logits_buffer[:chunk.numel()] if low_precision else None,
                                (block_targets[start:stop] + row_offsets[:k]).view(-1), block_weights[start:stop],
                                block_sums[start:stop], block_target_logits[start:stop], shift_first=not skip_shift,
                                recompute=functools.partial(torch.mm, block_columns_base2[start:stop], block_matrix,
                                                            out=chunk.view(k, -1)))
                    grad_logits = gemm_logits.view(-1, c * pixels)
                    product = rows.t() @ grad_logits if low_precision else grad_logits.t() @ rows
                    if block_grad_matrix is None:  # several bf16 products are summed in float32
                        block_grad_matrix = product if single_gemm or not low_precision else product.float()
                    else:
                        block_grad_matrix += product
                    column_grads = grad_logits @ block_matrix.t()
                    if single_gemm:
                        block_grad_columns = column_grads
                    else:
                        block_grad_columns[gemm_start:gemm_stop] = column_grads
                if softmax_kernel is None:
                    loss += ((block_sums.log2_() - block_target_logits) * block_weights).sum(dtype=torch.float64)  # bits
                else:
                    loss += block_row_losses.sum()
                # axes (i, t_y, t_x) and (o, r_y, r_x), back to the kernel's
                if low_precision:
                    grad_parts = block_grad_matrix.view(c, 2, 2, c, y_hi - y_lo, x_hi - x_lo)
                else:
                    grad_parts = block_grad_matrix.view(c, y_hi - y_lo, x_hi - x_lo, c, 2, 2).permute(3, 4, 5, 0, 1, 2)
                # add_ rather than +=, which would copy each slice onto itself afterwards
                for t_y, t_x in _TAPS:
                    grad_kernel[:, :, 1 - t_y, y_lo:y_hi, 1 - t_x, x_lo:x_hi].add_(grad_parts[:, t_y, t_x])
                grad_columns[:, y_first:y_stop, x_first:x_stop].add_(block_grad_columns.view(
                    n, y_stop - y_first, x_stop - x_first, 4 * c))
        ctx.save_for_backward(grad_kernel, grad_columns)
        ctx.geometry = (n, c, h, w, s, score.dtype, weight.dtype)
        return (loss * math.log(2)).float()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_kernel, grad_columns = ctx.saved_tensors
        n, c, h, w, s, score_dtype, weight_dtype = ctx.geometry
        grad_score = F.fold(grad_columns.view(n, -1, 4 * c).transpose(1, 2), (h, w), 2, padding=1)
        grad_weight = grad_kernel.view(c, c, 2 * s, 2 * s)
        return ((grad_score * grad_loss).to(score_dtype), (grad_weight * grad_loss).to(weight_dtype),
                None, None, None, None, None, None)


__all__ = ["upsample_cross_entropy"]
