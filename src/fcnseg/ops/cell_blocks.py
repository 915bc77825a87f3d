"""The learned upsampler's output as blocks of cells, each block one GEMM: the fused loss's geometry.

A transposed convolution of stride s and kernel 2s fills each s x s output cell from the 2x2
neighbourhood of scores around it (`fcnseg.models.upsample.transposed_conv_as_conv_weight`), so
the cells are rows of a GEMM whose matrix is a slice of the kernel. `cell_runs` groups the cells
along each axis into runs that share their in-image pixels, `CellBlock` is one run per axis with its
GEMM's rows, matrix, targets and weights, and `run_pixels` reads a run's pixels out of an image.
"""
from __future__ import annotations

import torch

# F.unfold's taps (t_y, t_x) of a 2x2 neighbourhood of scores.
TAPS = ((0, 0), (0, 1), (1, 0), (1, 1))


def cell_runs(cells: int, stride: int, length: int, *, whole_cells: bool | None = None) -> list[tuple[int, int, int, int]]:
    """The upsampler's output cells along one axis, as runs of (half-)cells that overlap the image alike.

    Cell ``m`` covers canvas positions ``m*s .. m*s + s - 1``; the image covers ``s/2 .. s/2 +
    length - 1`` of the canvas (the upsampler's output starts half a stride before the image). So
    the first and last cells lie half outside it, and the cells of a padded input's margin wholly:
    their pixels are never labelled and are not computed (at 320x480 that is 15% of the work).
    Each half of a cell is a run of its own, so that every cell of a run shares its in-image pixels
    (one GEMM per run) and an image of whole strides needs only two runs per axis; half-cells also
    make GEMMs of a shape that measured 30% faster here than whole cells. Below stride 8 a half-cell
    holds fewer pixels (4 at stride 4) than the softmax kernel's 16 lanes, so there (``whole_cells``
    None) runs are of whole cells, the first and last cell runs of their own.

    Returns:
        ``(first_cell, stop_cell, lo, hi)`` per run: the cells ``first_cell .. stop_cell - 1`` whose
        pixels ``lo .. hi - 1`` (offsets within a cell) lie in the image.
    """
    runs: list[tuple[int, int, int, int]] = []
    half = stride // 2
    parts = 1 if (stride < 8 if whole_cells is None else whole_cells) else 2
    piece = stride // parts
    for part in range(parts):
        for m in range(cells):
            lo = max(m * stride + part * piece, half) - m * stride
            hi = min(m * stride + (part + 1) * piece, half + length) - m * stride
            if hi <= lo:
                continue
            if runs and runs[-1][1] == m and runs[-1][2:] == (lo, hi):
                runs[-1] = (runs[-1][0], m + 1, lo, hi)
            else:
                runs.append((m, m + 1, lo, hi))
    return runs


def run_pixels(image: torch.Tensor, runs: tuple[tuple[int, int, int, int], ...], stride: int) -> torch.Tensor:
    """The pixels of ``image`` ``(N, H, W)`` that one `cell_runs` run per axis covers, ``(cells, pixels)``.

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


class CellBlock:
    """One `cell_runs` run per axis as one GEMM: its rows, the kernel's slice as a matrix, its pixels' classes and weights.

    Args:
        columns, columns_base2: ``(N, h+1, w+1, 4C)`` neighbourhoods of scores, as is and in base 2.
        kernel: the upsampler's weight as ``(C, C, 2, s, 2, s)``, axes ``(i, o, k_y, r_y, k_x, r_x)``.
        targets, weights: ``(N, H, W)`` each pixel's class and weight in the loss.
        runs: one `cell_runs` run per axis, ``(y_run, x_run)``.
        stride: the upsampler's stride s.
        bias_base2: the upsampler's ``(C,)`` bias times log2(e), float32, or None without a bias.
    """

    def __init__(self, columns: torch.Tensor, columns_base2: torch.Tensor, kernel: torch.Tensor,
                 targets: torch.Tensor, weights: torch.Tensor, runs: tuple, stride: int,
                 bias_base2: torch.Tensor | None = None) -> None:
        (y_first, y_stop, y_lo, y_hi), (x_first, x_stop, x_lo, x_hi) = self.runs = runs
        self.num_classes = c = kernel.shape[0]
        self.pixels = pixels = (y_hi - y_lo) * (x_hi - x_lo)
        # (cells, 4C) rows (i, t_y, t_x), (C, pixels) columns (o, r_y, r_x): only the pixels of
        # these cells in the image. Class-major columns let every step of the softmax run over a
        # strided class axis and vectorise across pixels.
        self.columns = columns[:, y_first:y_stop, x_first:x_stop].reshape(-1, 4 * c)
        self.columns_base2 = columns_base2[:, y_first:y_stop, x_first:x_stop].reshape(-1, 4 * c)
        matrix = torch.empty((c, 2, 2, c, y_hi - y_lo, x_hi - x_lo), dtype=columns.dtype, device=columns.device)
        for t_y, t_x in TAPS:
            matrix[:, t_y, t_x] = kernel[:, :, 1 - t_y, y_lo:y_hi, 1 - t_x, x_lo:x_hi]  # (i, o, r_y, r_x)
        self.matrix = matrix.view(4 * c, c * pixels)
        # The bias as a row of the logits (o, r_y, r_x): each class's value once per pixel.
        self.bias_row = None if bias_base2 is None else bias_base2.to(columns.dtype).repeat_interleave(pixels)
        # contiguous, as the kernel requires: reshape returns a strided view for a few shapes
        self.classes = run_pixels(targets, runs, stride).contiguous()
        self.weights = run_pixels(weights, runs, stride).contiguous()

    def logits_base2(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start .. stop - 1``'s logits in base 2 into ``out`` ``(rows, C * pixels)``: one GEMM.

        With a bias, the GEMM adds it (addmm); without, the plain product, as fast as before the
        bias existed.
        """
        if self.bias_row is None:
            return torch.mm(self.columns_base2[start:stop], self.matrix, out=out)
        return torch.addmm(self.bias_row, self.columns_base2[start:stop], self.matrix, out=out)


__all__ = ["TAPS", "CellBlock", "cell_runs", "run_pixels"]
