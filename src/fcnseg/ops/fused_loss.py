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
with a softmax of `fcnseg.ops.chunk_softmax` in between, the block's loss, and its gradients added.
With the Dice term (`fcnseg.ops.fused_dice`), a first pass over the blocks collects its sums.
"""
from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from fcnseg.constants import IGNORE_INDEX
from fcnseg.models.upsample import TransposedConvUpsampler, low_precision_dtype
from fcnseg.ops.cell_blocks import TAPS, CellBlock, cell_runs
from fcnseg.ops.chunk_softmax import ChunkBuffers, EagerSoftmax, KernelSoftmax, rows_per_chunk
from fcnseg.ops.fused_dice import DiceSoftmax, DiceTerms
from fcnseg.ops.native import softmax_grad_kernel

# Pixels per chunk: 2**17 pixels of 21 classes are 11 MB of float32 logits, small enough to stay in
# this CPU's cache, large enough for efficient GEMMs.
PIXELS_PER_CHUNK = 2**17
# Pixels per GEMM in low precision: 2**19 pixels of 21 classes are 22 MB of bf16 logits, within
# this CPU's 32 MB L3 cache.
PIXELS_PER_GEMM = 2**19
_LOG2_E = 1 / math.log(2)


def upsample_cross_entropy(
    score: torch.Tensor,
    upsampler: TransposedConvUpsampler,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    dice: bool = False,
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
        dice: add the soft Dice loss of the batch (`fcnseg.ops.losses.dice_loss`): the "ce+dice" loss.

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
                                           class_weights, reduction, ignore_index, dtype, dice)


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


class _FusedPass:
    """The forward's state across blocks: buffers reused by every chunk, and the loss and gradients summed."""

    def __init__(self, kernel: torch.Tensor, grid: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device, softmax_kernel: ModuleType | None, with_bias: bool = False) -> None:
        (n, h, w), c, s = grid, kernel.shape[0], kernel.shape[3]
        self.n, self.c, self.device, self.softmax_kernel = n, c, device, softmax_kernel
        low_precision = dtype != torch.float32
        self.loss = torch.zeros((), dtype=torch.float64, device=device)  # in bits
        self.grad_kernel = torch.zeros(kernel.shape, dtype=torch.float32, device=device)
        self.grad_bias = torch.zeros(c, dtype=torch.float32, device=device) if with_bias else None
        self.grad_columns = torch.zeros((n, h + 1, w + 1, 4 * c), dtype=torch.float32, device=device)
        # Buffers, reused: a fresh 11 MB tensor per operation costs more in page faults than the
        # softmax itself (measured 13 ms against 4 ms per chunk). In low precision the GEMMs run
        # over larger chunks than the float32 softmax: fewer, larger products, and the weight's
        # gradient summed once per GEMM chunk (6% faster per step here); in float32 the softmax
        # works in place on the GEMM's output, which must then stay in cache.
        softmax_size = max(PIXELS_PER_CHUNK, s * s) * c  # at least one GEMM row: a whole cell
        self.gemm_size = max(PIXELS_PER_GEMM * c, softmax_size) if low_precision else softmax_size
        logits_buffer = torch.empty(softmax_size, dtype=torch.float32, device=device)
        self.gemm_buffer = (torch.empty(self.gemm_size, dtype=dtype, device=device) if low_precision
                            else logits_buffer)
        # On CPU the eager softmax first tries without its max shift; elsewhere checking the sums
        # would synchronise with the device once per chunk, which costs more.
        self.buffers = ChunkBuffers(softmax_size, logits_buffer, low_precision, shift_first=device.type != "cpu",
                                    device=device)

    def add_dice_sums(self, block: CellBlock, terms: DiceTerms) -> None:
        """The first pass of the Dice term over one block: its logits GEMMs and softmax, summed into ``terms``."""
        total_rows = block.columns.shape[0]
        gemm_rows = rows_per_chunk(total_rows, self.c * block.pixels, self.gemm_size)
        softmax = DiceSoftmax(self.buffers, block, gemm_rows, terms)
        for gemm_start in range(0, total_rows, gemm_rows):
            gemm_stop = min(gemm_start + gemm_rows, total_rows)
            gemm_logits = self.gemm_buffer[:(gemm_stop - gemm_start) * self.c * block.pixels]
            block.logits_base2(gemm_start, gemm_stop, gemm_logits.view(-1, self.c * block.pixels))
            softmax(gemm_logits, gemm_start, gemm_stop)

    def add_block(self, block: CellBlock, dice: DiceTerms | None = None) -> None:
        """Computes one block's loss and gradients GEMM chunk by GEMM chunk and adds them to the totals
        (with the Dice term's gradient, once ``dice``'s sums are finished)."""
        total_rows = block.columns.shape[0]
        gemm_rows = rows_per_chunk(total_rows, self.c * block.pixels, self.gemm_size)
        single_gemm = gemm_rows >= total_rows
        grad_columns = None if single_gemm else torch.empty(block.columns.shape, dtype=torch.float32,
                                                            device=self.device)
        if dice is not None:
            softmax = DiceSoftmax(self.buffers, block, gemm_rows, dice)
        elif self.softmax_kernel is None:
            softmax = EagerSoftmax(self.buffers, block, gemm_rows)
        else:
            softmax = KernelSoftmax(self.softmax_kernel, block)
        grad_matrix, grad_columns = self._gemm_chunks(block, softmax, gemm_rows, grad_columns)
        self.loss += softmax.loss()
        self._add_gradients(block, grad_matrix, grad_columns)

    def _gemm_chunks(self, block: CellBlock, softmax: EagerSoftmax | KernelSoftmax | DiceSoftmax, gemm_rows: int,
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
            product = rows.t() @ grad_logits if self.buffers.low_precision else grad_logits.t() @ rows
            if grad_matrix is None:  # several bf16 products are summed in float32
                grad_matrix = product if single_gemm or not self.buffers.low_precision else product.float()
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
        if self.buffers.low_precision:
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
    def forward(ctx, score, weight, bias, target, stride, class_weights, reduction, ignore_index, dtype, dice):
        """The loss, block by block over the upsampler's cell runs; keeps the gradients for backward."""
        n, c, h, w = score.shape
        height, width = target.shape[-2:]
        device = score.device
        # As `transposed_conv_as_conv_weight` explains, output cell m takes input m through kernel
        # rows 0..s-1 and input m-1 through rows s..2s-1: the kernel half k_y = 1 - t_y serves
        # F.unfold's tap t_y of a 2x2 neighbourhood (columns likewise). Axes (i, o, k_y, r_y, k_x, r_x).
        kernel = weight.detach().view(c, c, 2, stride, 2, stride)
        columns, columns_base2 = _neighbourhood_columns(score, dtype)
        # On CPUs with AVX-512 and native bf16, a compiled kernel does the whole softmax in one pass
        # (cross-entropy's only: the Dice term's softmax is eager).
        native_softmax = device.type == "cpu" and dtype == torch.bfloat16 and not dice
        softmax_kernel = softmax_grad_kernel() if native_softmax else None
        targets, weights = _pixel_targets(target, class_weights, reduction, ignore_index,
                                          safe_void=softmax_kernel is None or class_weights is not None)
        # A bias adds to the logits before the softmax: in base 2, bias * log2(e).
        bias_base2 = None if bias is None else bias.detach().float() * _LOG2_E
        fused = _FusedPass(kernel, (n, h, w), dtype, device, softmax_kernel, with_bias=bias is not None)
        blocks = (CellBlock(columns, columns_base2, kernel, targets, weights, (y_run, x_run), stride, bias_base2)
                  for y_run in cell_runs(h + 1, stride, height) for x_run in cell_runs(w + 1, stride, width))
        terms, dice_loss = None, 0.0
        if dice:  # two passes: the blocks are kept (without Dice each is made, used and freed in turn)
            blocks = list(blocks)
            terms = DiceTerms(target, c, stride, ignore_index)
            for block in blocks:
                fused.add_dice_sums(block, terms)
            dice_loss = terms.finish()
        for block in blocks:
            fused.add_block(block, terms)
        ctx.save_for_backward(fused.grad_kernel, fused.grad_columns, fused.grad_bias)  # grad_bias None without a bias
        ctx.geometry = (n, c, h, w, stride, score.dtype, weight.dtype, None if bias is None else bias.dtype)
        return (fused.loss * math.log(2) + dice_loss).float()

    @staticmethod
    def backward(ctx, grad_loss):
        """The saved gradients, scaled by the incoming one (the loss is the last operation)."""
        grad_kernel, grad_columns, grad_bias = ctx.saved_tensors
        n, c, h, w, s, score_dtype, weight_dtype, bias_dtype = ctx.geometry
        grad_score = F.fold(grad_columns.view(n, -1, 4 * c).transpose(1, 2), (h, w), 2, padding=1)
        grad_weight = grad_kernel.view(c, c, 2 * s, 2 * s)
        grad_bias = None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype)
        return ((grad_score * grad_loss).to(score_dtype), (grad_weight * grad_loss).to(weight_dtype), grad_bias,
                None, None, None, None, None, None, None)


__all__ = ["upsample_cross_entropy"]
