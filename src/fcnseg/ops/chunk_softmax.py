"""The fused loss's softmax over one GEMM chunk of logits: cross-entropy's gradient made in place.

`KernelSoftmax` runs the compiled kernel of `fcnseg.ops.native` (CPUs with native bf16);
`EagerSoftmax` the same computation in torch operations, chunk by chunk of `ChunkBuffers.softmax_size`
values. Both turn base-2 logits ``(rows, C, pixels)`` into d loss / d logits and keep what the
block's loss needs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from fcnseg.ops.cell_blocks import CellBlock

# Sums of unshifted exp2 within which the softmax is computed without the max shift.
_SAFE_SUM_MIN, _SAFE_SUM_MAX = 2.0**-64, 2.0**64


@dataclass
class ChunkBuffers:
    """What every chunk of a fused pass shares: the softmax's chunk size, its float32 buffer, the precision.

    Attributes:
        softmax_size: values per softmax chunk.
        logits_buffer: float32 buffer of ``softmax_size`` values, reused by every chunk.
        low_precision: whether the GEMMs make the logits in a low-precision dtype.
        shift_first: whether the eager softmax shifts by each pixel's largest logit before exp2.
        device: where the chunks live.
    """

    softmax_size: int
    logits_buffer: torch.Tensor
    low_precision: bool
    shift_first: bool
    device: torch.device


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


def rows_per_chunk(rows: int, row_size: int, chunk_size: int) -> int:
    """Rows per chunk for chunks of at most ``chunk_size`` values (and one row at least), as equal as can be."""
    chunks = math.ceil(rows / max(1, chunk_size // row_size))
    return math.ceil(rows / chunks)


class KernelSoftmax:
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


class EagerSoftmax:
    """The softmax in torch operations, chunk by chunk of a GEMM chunk; keeps exp2 sums and target logits."""

    def __init__(self, fused: ChunkBuffers, block: CellBlock, gemm_rows: int) -> None:
        c, pixels, device = block.num_classes, block.pixels, fused.device
        self.fused, self.block = fused, block
        self.rows = rows_per_chunk(gemm_rows, c * pixels, fused.softmax_size)
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


__all__ = ["ChunkBuffers", "EagerSoftmax", "KernelSoftmax", "rows_per_chunk"]
