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

The forward's steps: `_neighbourhood_columns` (the GEMM rows), `_pixel_targets` (classes and
weights), then per `fcnseg.ops.cell_blocks.CellBlock` `_FusedPass.add_block`: the chunked GEMMs
with `_KernelSoftmax` or `_EagerSoftmax` in between, the block's loss, and its gradients added.
"""
from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from fcnseg.constants import IGNORE_INDEX
from fcnseg.models.upsample import TransposedConvUpsampler, low_precision_dtype
from fcnseg.ops.cell_blocks import TAPS, CellBlock, cell_runs
from fcnseg.ops.native import softmax_grad_kernel

# Pixels per chunk: 2**17 pixels of 21 classes are 11 MB of float32 logits, small enough to stay in
# this CPU's cache, large enough for efficient GEMMs.
PIXELS_PER_CHUNK = 2**17
# Pixels per GEMM in low precision: 2**19 pixels of 21 classes are 22 MB of bf16 logits, within
# this CPU's 32 MB L3 cache.
PIXELS_PER_GEMM = 2**19
_LOG2_E = 1 / math.log(2)
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
            ``w * s >= W``); its weight, and its bias if it has one, receive the gradient.
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
        return _UpsampleCrossEntropy.apply(score, upsampler.weight, upsampler.bias, target, upsampler.stride,
                                           class_weights, reduction, ignore_index, dtype)


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


def _neighbourhood_columns(score: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each output cell's 2x2 neighbourhood of scores, ``(N, h+1, w+1, 4C)`` in ``dtype``: as is, and in base 2.

    The rows of both GEMMs: one per output cell (y, x). The forward GEMM makes the logits in base 2,
    for exp2 (1.7x faster here than exp): its rows are scaled, a tenth of the values of the
    upsampler's matrix at 320x480.
    """
    n, c, h, w = score.shape
    neighbourhoods = F.unfold(score.detach().float(), 2, padding=1).view(n, 4 * c, h + 1, w + 1).permute(0, 2, 3, 1)
    return neighbourhoods.to(dtype), (neighbourhoods * _LOG2_E).to(dtype)


def _pixel_targets(
    target: torch.Tensor, class_weights: torch.Tensor | None, reduction: str, ignore_index: int, *, safe_void: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's class (int32) and its weight in the loss (0 for void), normalised for ``reduction``.

    int32 positions: index_select and index_add_ take them, with half the memory traffic. Void
    pixels weigh 0 but must still index a class (``safe_void``), except in the kernel, which never
    indexes.
    """
    labelled = target != ignore_index
    safe_targets = target.to(torch.int32)
    if safe_void:
        safe_targets = torch.where(labelled, safe_targets, 0)
    pixel_weights = labelled_float = labelled.float()
    if class_weights is not None:
        pixel_weights = pixel_weights * class_weights.float()[safe_targets.long()]
    if reduction == "mean":
        pixel_weights = pixel_weights / pixel_weights.sum().clamp(min=1e-12)
    else:
        pixel_weights = pixel_weights / labelled_float.flatten(1).sum(1).clamp(min=1).view(target.shape[0], 1, 1)
    return safe_targets.contiguous(), pixel_weights.contiguous()


class _KernelSoftmax:
    """The compiled kernel's softmax: one pass, in place, over a whole GEMM chunk; keeps per-row losses."""

    def __init__(self, softmax_kernel: ModuleType, block: CellBlock) -> None:
        self.softmax_kernel, self.block = softmax_kernel, block
        self.row_losses = torch.empty(block.columns.shape[0], dtype=torch.float64, device=block.columns.device)

    def __call__(self, gemm_logits: torch.Tensor, gemm_start: int, gemm_stop: int) -> None:
        """Turns the GEMM chunk's logits (rows ``gemm_start .. gemm_stop - 1``) into d loss / d logits."""
        block = self.block
        self.softmax_kernel.softmax_cross_entropy_grad_(
            gemm_logits.view(-1, block.num_classes, block.pixels), block.classes[gemm_start:gemm_stop],
            block.weights[gemm_start:gemm_stop], self.row_losses[gemm_start:gemm_stop])

    def loss(self) -> torch.Tensor:
        """The block's loss in bits, float64."""
        return self.row_losses.sum()


class _EagerSoftmax:
    """The softmax in torch operations, chunk by chunk of a GEMM chunk; keeps exp2 sums and target logits."""

    def __init__(self, fused: _FusedPass, block: CellBlock, gemm_rows: int) -> None:
        c, pixels, device = block.num_classes, block.pixels, fused.device
        self.fused, self.block = fused, block
        self.rows = _rows_per_chunk(gemm_rows, c * pixels, fused.softmax_size)
        # Each pixel's target logit: its flat position in a chunk, less the row's offset.
        self.targets = block.classes * pixels + torch.arange(pixels, dtype=torch.int32, device=device)
        self.row_offsets = torch.arange(self.rows, dtype=torch.int32, device=device).unsqueeze(1) * (c * pixels)
        # Each pixel's exp2 sum and target logit, kept for the loss, computed once per block.
        total_rows = block.columns.shape[0]
        self.sums = torch.empty((total_rows, pixels), dtype=torch.float32, device=device)
        self.target_logits = torch.empty((total_rows, pixels), dtype=torch.float32, device=device)

    def __call__(self, gemm_logits: torch.Tensor, gemm_start: int, gemm_stop: int) -> None:
        """Turns the GEMM chunk's logits (rows ``gemm_start .. gemm_stop - 1``) into d loss / d logits."""
        fused, block = self.fused, self.block
        c, pixels = block.num_classes, block.pixels
        for start in range(gemm_start, gemm_stop, self.rows):
            stop = min(start + self.rows, gemm_stop)
            k = stop - start
            chunk = gemm_logits[(start - gemm_start) * c * pixels:(stop - gemm_start) * c * pixels]
            chunk = chunk.view(k, c, pixels)
            _softmax_grad_(
                chunk, fused.logits_buffer[:chunk.numel()] if fused.low_precision else None,
                (self.targets[start:stop] + self.row_offsets[:k]).view(-1), block.weights[start:stop],
                self.sums[start:stop], self.target_logits[start:stop], shift_first=fused.shift_first,
                recompute=functools.partial(block.logits_base2, start, stop, chunk.view(k, -1)))

    def loss(self) -> torch.Tensor:
        """The block's loss in bits, float64."""
        return ((self.sums.log2_() - self.target_logits) * self.block.weights).sum(dtype=torch.float64)


class _FusedPass:
    """The forward's state across blocks: buffers reused by every chunk, and the loss and gradients summed."""

    def __init__(self, kernel: torch.Tensor, grid: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device, softmax_kernel: ModuleType | None, with_bias: bool = False) -> None:
        (n, h, w), c, s = grid, kernel.shape[0], kernel.shape[3]
        self.n, self.c, self.device, self.softmax_kernel = n, c, device, softmax_kernel
        self.low_precision = low_precision = dtype != torch.float32
        self.loss = torch.zeros((), dtype=torch.float64, device=device)  # in bits
        self.grad_kernel = torch.zeros(kernel.shape, dtype=torch.float32, device=device)
        self.grad_bias = torch.zeros(c, dtype=torch.float32, device=device) if with_bias else None
        self.grad_columns = torch.zeros((n, h + 1, w + 1, 4 * c), dtype=torch.float32, device=device)
        # Buffers, reused: a fresh 11 MB tensor per operation costs more in page faults than the
        # softmax itself (measured 13 ms against 4 ms per chunk). In low precision the GEMMs run
        # over larger chunks than the float32 softmax: fewer, larger products, and the weight's
        # gradient summed once per GEMM chunk (6% faster per step here); in float32 the softmax
        # works in place on the GEMM's output, which must then stay in cache.
        self.softmax_size = max(PIXELS_PER_CHUNK, s * s // 4) * c
        self.gemm_size = max(PIXELS_PER_GEMM * c, self.softmax_size) if low_precision else self.softmax_size
        self.logits_buffer = torch.empty(self.softmax_size, dtype=torch.float32, device=device)
        self.gemm_buffer = (torch.empty(self.gemm_size, dtype=dtype, device=device) if low_precision
                            else self.logits_buffer)
        # On CPU the eager softmax first tries without its max shift (see `_softmax_grad_`); elsewhere
        # checking the sums would synchronise with the device once per chunk, which costs more.
        self.shift_first = device.type != "cpu"

    def add_block(self, block: CellBlock) -> None:
        """Computes one block's loss and gradients GEMM chunk by GEMM chunk and adds them to the totals."""
        total_rows = block.columns.shape[0]
        gemm_rows = _rows_per_chunk(total_rows, self.c * block.pixels, self.gemm_size)
        single_gemm = gemm_rows >= total_rows
        grad_columns = None if single_gemm else torch.empty(block.columns.shape, dtype=torch.float32,
                                                            device=self.device)
        softmax = (_EagerSoftmax(self, block, gemm_rows) if self.softmax_kernel is None
                   else _KernelSoftmax(self.softmax_kernel, block))
        grad_matrix, grad_columns = self._gemm_chunks(block, softmax, gemm_rows, grad_columns)
        self.loss += softmax.loss()
        self._add_gradients(block, grad_matrix, grad_columns)

    def _gemm_chunks(self, block: CellBlock, softmax: _EagerSoftmax | _KernelSoftmax, gemm_rows: int,
                     grad_columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits GEMM, the softmax and both backward GEMMs per chunk of rows, while the logits are in cache.

        Returns the block's gradients: the weight's as a matrix, and its rows' (its cells' columns).
        """
        c, pixels = self.c, block.pixels
        total_rows = block.columns.shape[0]
        single_gemm = grad_columns is None
        # The weight's gradient as the faster GEMM makes it here: (4C, C * pixels) in bf16,
        # transposed (C * pixels, 4C) in float32 (1.4-1.7x faster than the other way round).
        # With one GEMM chunk, the products are the block's gradients as they come.
        grad_matrix = None
        for gemm_start in range(0, total_rows, gemm_rows):
            gemm_stop = min(gemm_start + gemm_rows, total_rows)
            rows = block.columns[gemm_start:gemm_stop]
            gemm_logits = self.gemm_buffer[:rows.shape[0] * c * pixels]
            block.logits_base2(gemm_start, gemm_stop, gemm_logits.view(-1, c * pixels))
            softmax(gemm_logits, gemm_start, gemm_stop)
            grad_logits = gemm_logits.view(-1, c * pixels)
            if self.grad_bias is not None:  # the bias's gradient: d loss / d logits summed over pixels
                self.grad_bias += grad_logits.view(-1, c, pixels).sum((0, 2), dtype=torch.float32)
            product = rows.t() @ grad_logits if self.low_precision else grad_logits.t() @ rows
            if grad_matrix is None:  # several bf16 products are summed in float32
                grad_matrix = product if single_gemm or not self.low_precision else product.float()
            else:
                grad_matrix += product
            column_grads = grad_logits @ block.matrix.t()
            if single_gemm:
                grad_columns = column_grads
            else:
                grad_columns[gemm_start:gemm_stop] = column_grads
        return grad_matrix, grad_columns

    def _add_gradients(self, block: CellBlock, grad_matrix: torch.Tensor, grad_columns: torch.Tensor) -> None:
        """Adds one block's gradients to the kernel's and the neighbourhood columns' totals."""
        (y_first, y_stop, y_lo, y_hi), (x_first, x_stop, x_lo, x_hi) = block.runs
        c = self.c
        # axes (i, t_y, t_x) and (o, r_y, r_x), back to the kernel's
        if self.low_precision:
            grad_parts = grad_matrix.view(c, 2, 2, c, y_hi - y_lo, x_hi - x_lo)
        else:
            grad_parts = grad_matrix.view(c, y_hi - y_lo, x_hi - x_lo, c, 2, 2).permute(3, 4, 5, 0, 1, 2)
        # add_ rather than +=, which would copy each slice onto itself afterwards
        for t_y, t_x in TAPS:
            self.grad_kernel[:, :, 1 - t_y, y_lo:y_hi, 1 - t_x, x_lo:x_hi].add_(grad_parts[:, t_y, t_x])
        self.grad_columns[:, y_first:y_stop, x_first:x_stop].add_(grad_columns.view(
            self.n, y_stop - y_first, x_stop - x_first, 4 * c))


class _UpsampleCrossEntropy(torch.autograd.Function):
    """The fused loss for autograd: the gradients are made in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, score, weight, bias, target, stride, class_weights, reduction, ignore_index, dtype):
        """The loss, block by block over the upsampler's cell runs; keeps the gradients for backward."""
        n, c, h, w = score.shape
        height, width = target.shape[-2:]
        device = score.device
        # As `transposed_conv_as_conv_weight` explains, output cell m takes input m through kernel
        # rows 0..s-1 and input m-1 through rows s..2s-1: the kernel half k_y = 1 - t_y serves
        # F.unfold's tap t_y of a 2x2 neighbourhood (columns likewise). Axes (i, o, k_y, r_y, k_x, r_x).
        kernel = weight.detach().view(c, c, 2, stride, 2, stride)
        columns, columns_base2 = _neighbourhood_columns(score, dtype)
        # On CPUs with AVX-512 and native bf16, a compiled kernel does the whole softmax in one pass.
        softmax_kernel = softmax_grad_kernel() if device.type == "cpu" and dtype == torch.bfloat16 else None
        targets, weights = _pixel_targets(target, class_weights, reduction, ignore_index,
                                          safe_void=softmax_kernel is None or class_weights is not None)
        # A bias adds to the logits before the softmax: in base 2, bias * log2(e).
        bias_base2 = None if bias is None else bias.detach().float() * _LOG2_E
        fused = _FusedPass(kernel, (n, h, w), dtype, device, softmax_kernel, with_bias=bias is not None)
        for y_run in cell_runs(h + 1, stride, height):
            for x_run in cell_runs(w + 1, stride, width):
                fused.add_block(CellBlock(columns, columns_base2, kernel, targets, weights, (y_run, x_run), stride,
                                          bias_base2))
        ctx.save_for_backward(fused.grad_kernel, fused.grad_columns, fused.grad_bias)  # grad_bias None without a bias
        ctx.geometry = (n, c, h, w, stride, score.dtype, weight.dtype, None if bias is None else bias.dtype)
        return (fused.loss * math.log(2)).float()

    @staticmethod
    def backward(ctx, grad_loss):
        """The saved gradients, scaled by the incoming one (the loss is the last operation)."""
        grad_kernel, grad_columns, grad_bias = ctx.saved_tensors
        n, c, h, w, s, score_dtype, weight_dtype, bias_dtype = ctx.geometry
        grad_score = F.fold(grad_columns.view(n, -1, 4 * c).transpose(1, 2), (h, w), 2, padding=1)
        grad_weight = grad_kernel.view(c, c, 2 * s, 2 * s)
        grad_bias = None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype)
        return ((grad_score * grad_loss).to(score_dtype), (grad_weight * grad_loss).to(weight_dtype), grad_bias,
                None, None, None, None, None, None)


__all__ = ["upsample_cross_entropy"]
