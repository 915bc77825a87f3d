"""The FCN's transposed-convolution upsampler, bilinear kernel, and its fast exact computation.

The chapter upsamples with ``nn.ConvTranspose2d(C, C, kernel_size=2s, stride=s, padding=s/2)``
whose weight starts as bilinear interpolation. We keep exactly those parameters (same shape, same
layout, same initialisation) but compute the layer differently: torch's CPU ConvTranspose2d is a
GEMM followed by a scatter-add (col2im) over a 2s x 2s kernel, which costs a quarter of the FCN's
time for 5% of its FLOPs.

With kernel 2s and stride s, every output pixel receives exactly 2 x 2 input pixels. Grouping
output pixels by their position inside an s x s cell gives an ordinary 2 x 2 convolution with
``C_out * s * s`` output channels (one per sub-pixel position) followed by a pixel shuffle: the
same multiply-adds as the transposed convolution, but accumulated inside one dense GEMM instead of
a scatter. When the weight is the fixed bilinear kernel (upsampler="fixed"), the layer is plain
per-channel separable interpolation and is computed as two small matrix products.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.runtime import native_cpu_bf16

UpsamplerInit = Literal["bilinear", "xavier", "fixed"]
UPSAMPLER_CHOICES: tuple[str, ...] = ("bilinear", "xavier", "fixed")


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """The chapter's bilinear-interpolation weight for a transposed convolution.

    Channel ``i`` maps to channel ``i`` only, with the separable tent filter ``(1 - |x - c| / f)``;
    channels beyond ``min(in_channels, out_channels)`` get zeros, as in the chapter.

    Args:
        in_channels: input channels of the transposed convolution.
        out_channels: output channels.
        kernel_size: side of the square kernel (``2 * stride`` for exact bilinear upsampling).

    Returns:
        float32 tensor of shape ``(in_channels, out_channels, kernel_size, kernel_size)``, the
        layout of ``nn.ConvTranspose2d.weight``.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = (torch.arange(kernel_size).reshape(-1, 1), torch.arange(kernel_size).reshape(1, -1))
    filt = (1 - torch.abs(og[0] - center) / factor) * (1 - torch.abs(og[1] - center) / factor)
    weight = torch.zeros((in_channels, out_channels, kernel_size, kernel_size))
    n = min(in_channels, out_channels)
    weight[range(n), range(n), :, :] = filt.float()
    return weight


def transposed_conv_as_conv_weight(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Rearranges a ConvTranspose2d weight (kernel 2s, stride s, padding s/2) for `subpixel_conv`.

    In a frame shifted by s/2, output cell ``m`` (pixels ``m*s - s/2 .. m*s + s/2 - 1``) takes input
    ``m`` through kernel rows ``0..s-1`` and input ``m-1`` through rows ``s..2s-1``: a 2x2
    convolution (padding 1) whose taps are the two halves of the kernel, flipped.

    Args:
        weight: ``(C_in, C_out, 2s, 2s)``.
        stride: s, even.

    Returns:
        ``(C_in * 4, s * s * C_out)`` matrix, rows ordered (i, t_y, t_x) as ``F.unfold`` orders
        them, columns (r_y, r_x, o). Differentiable with respect to ``weight``.
    """
    c_in, c_out = weight.shape[:2]
    s = stride
    shaped = weight.reshape(c_in, c_out, 2, s, 2, s).flip(2, 4)  # (i, o, t_y, r_y, t_x, r_x)
    return shaped.permute(0, 2, 4, 3, 5, 1).reshape(c_in * 4, s * s * c_out)


# From this stride up, `subpixel_conv` makes its output in four GEMMs, one per quadrant of the
# output cells, straight into an output of exactly H*s x W*s: the half-cells of the canvas's border,
# which lie outside the output, are never computed (15% of the multiply-adds at 10x15 -> 320x480),
# and the GEMM shape measured 20-35% faster here (stride 16 and 32, batch 8). At strides 2 and 8
# the single GEMM over whole cells measured faster.
HALF_CELL_MIN_STRIDE = 16


def half_cell_matrices(matrix: torch.Tensor, stride: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """`transposed_conv_as_conv_weight`'s matrix split by the quadrant of the output cell it fills.

    Output row ``Y = s*q + (s/2)*j_y + r`` (``r < s/2``) lies in cell ``q + j_y`` of the canvas,
    which starts half a stride before the output: in its second half of rows when ``j_y = 0``,
    in its first when ``j_y = 1``; columns likewise.

    Returns:
        ``m[j_y][j_x]``, each ``(C_in * 4, (s/2)**2 * C_out)``, columns ``(r_y, r_x, o)``.
        Differentiable with respect to ``matrix``.
    """
    s, half = stride, stride // 2
    cells = matrix.view(matrix.shape[0], s, s, -1)
    return tuple(tuple(cells[:, (1 - jy) * half:(2 - jy) * half, (1 - jx) * half:(2 - jx) * half].reshape(
        matrix.shape[0], -1) for jx in (0, 1)) for jy in (0, 1))


def subpixel_conv(
    x: torch.Tensor,
    matrix: torch.Tensor,
    stride: int,
    half_cells: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Computes ConvTranspose2d(kernel 2s, stride s, padding s/2) from its rearranged weight.

    Args:
        x: ``(N, C_in, H, W)``.
        matrix: output of `transposed_conv_as_conv_weight`.
        stride: s.
        half_cells: ``half_cell_matrices(matrix, stride)``, if already made (they are used from
            ``HALF_CELL_MIN_STRIDE`` up).
        bias: ``(C_out,)`` in ``matrix``'s dtype, added to every output pixel (ConvTranspose2d's
            ``bias``), or None.

    Returns:
        ``(N, C_out, H*s, W*s)``, equal to ``F.conv_transpose2d`` up to float rounding, in
        channels-last memory (channels innermost suits the softmax over classes and the argmax
        that follow): from ``HALF_CELL_MIN_STRIDE`` up a channels-last tensor, below it a view into
        a slightly larger canvas.
    """
    n, _, h, w = x.shape
    s, half = stride, stride // 2
    c_out = matrix.shape[1] // (s * s)
    if s >= HALF_CELL_MIN_STRIDE:
        return _half_cell_conv(x, half_cells or half_cell_matrices(matrix, s), s, c_out, bias)
    # unfold + matmul rather than conv2d: oneDNN handles this shape (tens of thousands of output
    # channels on a tiny map) at a third of GEMM speed.
    columns = F.unfold(x, 2, padding=1)  # (N, C_in*4, (H+1)*(W+1))
    # Columns ordered (r_y, r_x, o): the GEMM's rows are then cells (y, x) holding s rows of s*C_out
    # contiguous values, and the shuffle into the channels-last canvas (y, r_y, x, r_x, o) moves
    # runs of s*C_out values (of s values with the NCHW order: 30% slower at batch 8).
    cells = torch.matmul(columns.transpose(1, 2), matrix)  # (N, (H+1)*(W+1), s*s*C_out)
    if bias is not None:  # in place: the layout stays as it is; columns (r_y, r_x, o) repeat the classes
        cells.add_(bias.repeat(s * s))
    canvas = cells.view(n, h + 1, w + 1, s, s * c_out).permute(0, 1, 3, 2, 4)
    canvas = canvas.reshape(n, (h + 1) * s, (w + 1) * s, c_out).permute(0, 3, 1, 2)
    return canvas[..., half : half + h * s, half : half + w * s]


def _half_cell_conv(x: torch.Tensor, half_cells: tuple[tuple[torch.Tensor, torch.Tensor], ...], stride: int,
                    c_out: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    n, c_in, h, w = x.shape
    half = stride // 2
    # With a bias, each quadrant's GEMM adds it (addmm): columns (r_y, r_x, o) repeat the classes.
    bias_row = None if bias is None else bias.repeat(half * half)
    columns = F.unfold(x, 2, padding=1).view(n, 4 * c_in, h + 1, w + 1).permute(0, 2, 3, 1)  # cells (y, x)
    out = x.new_empty((n, h, 2, half, w, 2, half, c_out))  # (N, q_y, j_y, r_y, q_x, j_x, r_x, C)
    for jy in (0, 1):
        for jx in (0, 1):
            rows = columns[:, jy:jy + h, jx:jx + w].reshape(-1, 4 * c_in)
            product = rows @ half_cells[jy][jx] if bias_row is None else torch.addmm(bias_row, rows, half_cells[jy][jx])
            quadrant = product.view(n, h, w, half, half, c_out)
            out[:, :, jy, :, :, jx] = quadrant.permute(0, 1, 3, 2, 4, 5)
    return out.view(n, h * stride, w * stride, c_out).permute(0, 3, 1, 2)


def low_precision_dtype(device_type: str) -> torch.dtype:
    """The dtype the upsampler computes in: autocast's where it is native on this device, else float32."""
    if not torch.is_autocast_enabled(device_type):
        return torch.float32
    dtype = torch.get_autocast_dtype(device_type)
    if device_type == "cpu" and not native_cpu_bf16():
        return torch.float32
    return dtype


def _interpolation_matrix(size: int, stride: int, kernel_1d: torch.Tensor) -> torch.Tensor:
    """1-D matrix ``A`` with ``A @ v`` equal to a 1-D transposed conv (kernel 2s, stride s, pad s/2)."""
    k = kernel_1d.numel()
    pad = stride // 2
    a = torch.zeros(size * stride, size, dtype=kernel_1d.dtype)
    for p in range(size):
        for kk in range(k):
            y = p * stride - pad + kk
            if 0 <= y < size * stride:
                a[y, p] += kernel_1d[kk]
    return a


class TransposedConvUpsampler(nn.Module):
    """``nn.ConvTranspose2d(C, C, 2s, stride=s, padding=s/2, bias=bias)``, computed fast.

    Holds a ``weight`` parameter with the exact shape and meaning of ``nn.ConvTranspose2d.weight``
    (so state dicts and the chapter's initialisation carry over) and computes it with
    `subpixel_conv`, or with separable interpolation matrices when the weight is frozen bilinear.

    Args:
        channels: input and output channels (the number of classes).
        stride: upsampling factor s (even).
        init: "bilinear" (learned, bilinear start: the chapter), "xavier" (learned, random start:
            the chapter's exercise 1) or "fixed" (bilinear, not learned: the paper's ablation).
        bias: a learned per-class ``bias`` of shape ``(C,)`` added to every output pixel, as the
            chapter's ``nn.ConvTranspose2d`` has (its default); the paper's FCN has none (the
            default here), and then ``bias`` is None. It is learned even with ``init="fixed"``.
    """

    def __init__(self, channels: int, stride: int, init: UpsamplerInit = "bilinear", bias: bool = False) -> None:
        super().__init__()
        if stride < 2 or stride % 2:
            raise ValueError(f"stride must be an even number >= 2, got {stride}")
        if init not in UPSAMPLER_CHOICES:
            raise ValueError(f"unknown upsampler {init!r}; choose one of {', '.join(UPSAMPLER_CHOICES)}")
        self.channels = channels
        self.stride = stride
        self.kernel_size = 2 * stride
        self.padding = stride // 2
        self.init = init
        weight = bilinear_kernel(channels, channels, self.kernel_size)
        if init == "xavier":
            nn.init.xavier_uniform_(weight)
        self.weight = nn.Parameter(weight, requires_grad=init != "fixed")
        self.register_parameter("bias", None)
        if bias:
            # As torch's _ConvNd.reset_parameters initialises nn.ConvTranspose2d's bias (which the
            # chapter keeps when it overwrites the weight with the bilinear kernel): uniform in
            # +-1/sqrt(fan_in), fan_in = weight.size(1) * k * k for the (C_in, C_out, k, k) weight.
            bound = 1 / math.sqrt(weight.size(1) * self.kernel_size * self.kernel_size)
            self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))
        self._separable_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self._matrix_cache: tuple[tuple, tuple] | None = None

    @property
    def learnable(self) -> bool:
        return self.init != "fixed"

    def extra_repr(self) -> str:
        return (f"{self.channels}, {self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, init={self.init}, bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learnable and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            with torch.autocast(x.device.type, enabled=False):
                out = self._separable(x)
                return out if self.bias is None else out + self.bias.float().view(1, -1, 1, 1)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # Exporters know ConvTranspose natively; the fast path is a CPU-eager optimisation.
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.conv_transpose2d(x, self.weight.to(x.dtype), bias, stride=self.stride, padding=self.padding)
        # Under autocast the GEMM runs in the autocast dtype only where that dtype is native (CUDA,
        # CPUs with AVX-512 BF16 or AMX: 2.8x faster than fp32 here); emulated bf16 on other CPUs
        # is several times slower than fp32, so there it stays in float32.
        dtype = low_precision_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            matrix, half_cells = self._gemm_matrices(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            return subpixel_conv(x.to(dtype), matrix, self.stride, half_cells, bias)

    def _gemm_matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, tuple | None]:
        """The matrix and, from ``HALF_CELL_MIN_STRIDE`` up, its half-cell split, for `subpixel_conv`."""
        # Rearranging the 64x64 kernels costs a quarter of the layer at batch 1, so without autograd
        # (inference) the matrices are kept until the weight changes (its version counter moves).
        def make() -> tuple[torch.Tensor, tuple | None]:
            matrix = transposed_conv_as_conv_weight(self.weight.to(dtype), self.stride)
            halves = half_cell_matrices(matrix, self.stride) if self.stride >= HALF_CELL_MIN_STRIDE else None
            return matrix, halves

        if torch.is_grad_enabled() or torch.compiler.is_compiling() or self.weight.is_inference():
            # Training, or traced by torch.compile / torch.export: the graph computes the matrices
            # (freezing folds them into constants); the cache key reads a data pointer traced tensors lack.
            # A weight made under torch.inference_mode has no version counter to key a cache on.
            self._matrix_cache = None
            matrix, halves = make()
        else:
            key = (self.weight.data_ptr(), self.weight._version, dtype, self.weight.device)
            if self._matrix_cache is None or self._matrix_cache[0] != key:
                with torch.no_grad():
                    self._matrix_cache = (key, make())
            matrix, halves = self._matrix_cache[1]
        return matrix, halves

    def _separable(self, x: torch.Tensor) -> torch.Tensor:
        # A frozen bilinear weight is diagonal over channels and separable in y and x, so the
        # layer is out = A_h @ x @ A_w^T per channel: two small matmuls instead of a convolution.
        x = x.float()
        h, w = x.shape[-2:]
        key = (h, w, x.device, x.dtype)
        if self._separable_cache is None or self._separable_cache[0] != key:
            kernel_1d = self._kernel_1d()
            a_h = _interpolation_matrix(h, self.stride, kernel_1d).to(x.device, x.dtype)
            a_w = _interpolation_matrix(w, self.stride, kernel_1d).to(x.device, x.dtype)
            self._separable_cache = (key, a_h, a_w.t().contiguous())
        _, a_h, a_w_t = self._separable_cache
        return torch.matmul(a_h, torch.matmul(x.contiguous(), a_w_t))

    def _kernel_1d(self) -> torch.Tensor:
        k = self.kernel_size
        factor = (k + 1) // 2
        center = factor - 0.5
        return (1 - torch.abs(torch.arange(k, dtype=torch.float64) - center) / factor).float()

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        self._separable_cache = self._matrix_cache = None
        super()._load_from_state_dict(*args, **kwargs)
        if not self.learnable and not torch.allclose(
            self.weight.detach().cpu(), bilinear_kernel(self.channels, self.channels, self.kernel_size), atol=1e-6
        ):
            raise ValueError("a 'fixed' upsampler was given weights that are not the bilinear kernel")


def reference_transposed_conv(channels: int, stride: int, bias: bool = False) -> nn.ConvTranspose2d:
    """The chapter's layer as torch defines it (with ``bias=True``, exactly the chapter's), for tests and benchmarks."""
    return nn.ConvTranspose2d(channels, channels, kernel_size=2 * stride, stride=stride, padding=stride // 2, bias=bias)


def upsample_flops(channels: int, height: int, width: int, stride: int) -> float:
    """Multiply-add FLOPs (x2) of one transposed-conv upsampling of an ``height x width`` map."""
    return 2.0 * channels * channels * 4 * height * width * stride * stride


__all__ = [
    "bilinear_kernel",
    "TransposedConvUpsampler",
    "transposed_conv_as_conv_weight",
    "subpixel_conv",
    "half_cell_matrices",
    "reference_transposed_conv",
    "upsample_flops",
    "UPSAMPLER_CHOICES",
]

