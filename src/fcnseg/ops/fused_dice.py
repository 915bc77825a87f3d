"""The Dice term of the "ce+dice" loss inside the fused loss, without the full-resolution logits.

Soft Dice (`fcnseg.ops.losses.dice_loss`) ties every pixel to per-class sums over the batch: the
soft intersection ``I_c`` (class c's probability summed over the pixels labelled c) and the soft
cardinality ``P_c + G_c`` (its probability summed over labelled pixels, plus its pixel count). So
the fused loss takes two passes: the first runs the logits GEMMs and the softmax only, and adds
those sums up (`DiceTerms.add`); the second is the fused loss's usual pass, whose softmax
(`DiceSoftmax`) adds Dice's gradient to cross-entropy's. With respect to a labelled pixel's
probabilities that gradient is ``alpha_c [y = c] + beta_c``, with ``alpha_c = -2 / (C U_c)`` and
``beta_c = 2 I_c / (C U_c^2)`` for each class present (``U_c = P_c + G_c``; 0 for the others),
carried to the logits through the softmax's Jacobian. The cost is one more logits GEMM and softmax
per step, against writing, upsampling and reading the full-size logits unfused.
"""
from __future__ import annotations

import torch

from fcnseg.ops.cell_blocks import CellBlock, run_pixels
from fcnseg.ops.chunk_softmax import ChunkBuffers, rows_per_chunk


class DiceTerms:
    """The Dice term's per-class sums over one batch (first pass), then its value and coefficients.

    Args:
        target: ``(N, H, W)`` int64 class ids, ``ignore_index`` for void.
        num_classes: C.
        stride: the upsampler's stride, to read a `CellBlock`'s pixels out of the labelled mask.
        ignore_index: the void label.
    """

    def __init__(self, target: torch.Tensor, num_classes: int, stride: int, ignore_index: int) -> None:
        labelled = target != ignore_index
        self.num_classes, self.stride = num_classes, stride
        self.labelled = labelled.float()
        self.truth = torch.bincount(target[labelled], minlength=num_classes)[:num_classes].double()
        self.intersection = torch.zeros(num_classes, dtype=torch.float64, device=target.device)
        self.probability = torch.zeros(num_classes, dtype=torch.float64, device=target.device)
        self.alpha: torch.Tensor | None = None  # set by `finish`, which ends the first pass
        self.beta: torch.Tensor | None = None
        # The second pass's per-chunk factors, one buffer for every block (a fresh one per block
        # would cost page faults on every step).
        self.factors = torch.empty(0, dtype=torch.float32, device=target.device)

    def factor_buffer(self, size: int) -> torch.Tensor:
        """A float32 buffer of at least ``size`` values, reused across blocks."""
        if self.factors.numel() < size:
            self.factors = torch.empty(size, dtype=torch.float32, device=self.factors.device)
        return self.factors[:size]

    def block_labelled(self, block: CellBlock) -> torch.Tensor:
        """The labelled mask (1.0 or 0.0) of ``block``'s pixels, ``(cells, pixels)``."""
        return run_pixels(self.labelled, block.runs, self.stride).contiguous()

    def add(self, probs: torch.Tensor, target_probs: torch.Tensor, classes: torch.Tensor,
            labelled: torch.Tensor) -> None:
        """Adds one chunk's probabilities ``(k, C, pixels)`` to the sums (``target_probs``, ``classes``
        and ``labelled`` are ``(k, pixels)``)."""
        self.intersection.index_add_(0, classes.reshape(-1), (target_probs * labelled).reshape(-1).double())
        self.probability += torch.einsum("kcp,kp->c", probs, labelled).double()

    def finish(self) -> torch.Tensor:
        """The Dice loss ``mean_c present_c (1 - 2 I_c / U_c)``, float64; fixes the gradient's coefficients."""
        c = self.num_classes
        present = (self.truth > 0).double()
        # A class present has U_c >= 1; the clamp only keeps absent classes (weighted 0) finite.
        union = (self.probability + self.truth).clamp_min(1.0)
        loss = ((1.0 - 2.0 * self.intersection / union) * present).sum() / c
        self.alpha = (-2.0 * present / (c * union)).float()
        self.beta = (2.0 * present * self.intersection / (c * union**2)).float()
        return loss


class DiceSoftmax:
    """The softmax of a fused pass with the Dice term: collects `DiceTerms`' sums until they are
    finished, then makes cross-entropy's plus Dice's d loss / d logits in place, chunk by chunk.

    Always shifts by each pixel's largest logit, and works in float32 (`ChunkBuffers.logits_buffer`
    for low-precision logits), as `fcnseg.ops.chunk_softmax.EagerSoftmax` does.
    """

    def __init__(self, buffers: ChunkBuffers, block: CellBlock, gemm_rows: int, terms: DiceTerms) -> None:
        c, pixels, device = block.num_classes, block.pixels, buffers.device
        self.buffers, self.block, self.terms = buffers, block, terms
        self.rows = rows_per_chunk(gemm_rows, c * pixels, buffers.softmax_size)
        self.targets = block.classes * pixels + torch.arange(pixels, dtype=torch.int32, device=device)
        self.row_offsets = torch.arange(self.rows, dtype=torch.int32, device=device).unsqueeze(1) * (c * pixels)
        self.labelled = terms.block_labelled(block)
        self.bits = torch.zeros((), dtype=torch.float64, device=device)  # cross-entropy, second pass

    def __call__(self, gemm_logits: torch.Tensor, gemm_start: int, gemm_stop: int) -> None:
        """Adds the GEMM chunk's sums (first pass) or turns its logits into d loss / d logits (second)."""
        c, pixels = self.block.num_classes, self.block.pixels
        for start in range(gemm_start, gemm_stop, self.rows):
            stop = min(start + self.rows, gemm_stop)
            chunk = gemm_logits[(start - gemm_start) * c * pixels:(stop - gemm_start) * c * pixels]
            self._chunk(chunk.view(stop - start, c, pixels), start, stop)

    def _chunk(self, chunk: torch.Tensor, start: int, stop: int) -> None:
        k, c, pixels = chunk.shape
        buffers, block, terms = self.buffers, self.block, self.terms
        probs = chunk if not buffers.low_precision else buffers.logits_buffer[:chunk.numel()].view_as(chunk)
        if buffers.low_precision:
            probs.copy_(chunk)
        at_target = (self.targets[start:stop] + self.row_offsets[:k]).view(-1)
        flat = probs.view(-1)
        classes, labelled = block.classes[start:stop], self.labelled[start:stop]
        weights = block.weights[start:stop]
        largest = probs.amax(1, keepdim=True)
        if terms.alpha is not None:  # cross-entropy in bits: log2 of the sum of exp2, less the target logit
            shifted_targets = flat.index_select(0, at_target).view(k, pixels) - largest.view(k, pixels)
        probs.sub_(largest).exp2_()
        sums = probs.sum(1)
        probs.div_(sums.unsqueeze(1))
        target_probs = flat.index_select(0, at_target).view(k, pixels)
        if terms.alpha is None:
            terms.add(probs, target_probs, classes, labelled)
            return
        self.bits += ((sums.log2() - shifted_targets) * weights).sum(dtype=torch.float64)
        alpha_y = terms.alpha.index_select(0, classes.view(-1)).view(k, pixels)
        # d Dice / d z_ic = p_ic (g_ic - sum_k p_ik g_ik), g_ic = alpha_c [y = c] + beta_c on labelled pixels
        mixed = alpha_y * target_probs + torch.einsum("c,kcp->kp", terms.beta, probs)
        factors = terms.factor_buffer(buffers.softmax_size)[:chunk.numel()].view(k, c, pixels)
        torch.mul(labelled.unsqueeze(1), terms.beta.view(1, c, 1), out=factors)
        factors.add_((weights - labelled * mixed).unsqueeze(1))
        probs.mul_(factors)
        flat.index_add_(0, at_target, (labelled * alpha_y * target_probs - weights).view(-1))
        if buffers.low_precision:
            chunk.copy_(probs)

    def loss(self) -> torch.Tensor:
        """The block's cross-entropy in bits, float64 (the Dice term is `DiceTerms.finish`'s)."""
        return self.bits


__all__ = ["DiceSoftmax", "DiceTerms"]
