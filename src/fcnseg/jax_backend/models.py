"""The FCN (32s/16s/8s/4s) on ResNet-18/34/50 and MobileNetV2 in Flax Linen, as `fcnseg.models` computes it.

Layout is NHWC (XLA's preferred layout on CPUs); every module is named after the PyTorch module it
mirrors, with dotted names where torchvision nests ``nn.Sequential`` containers, so that a parameter's
path joined by dots is its PyTorch state-dict key (``backbone.stage8.4.0.conv1`` + ``kernel`` ->
``backbone.stage8.4.0.conv1.weight``): `fcnseg.jax_backend.convert` maps the two without a table.

``folded=True`` builds the inference form (`fcnseg.models.inference_form`): each BatchNorm folded into
the convolution before it, which then has a bias. Same arithmetic as PyTorch throughout: explicit
convolution padding, max-pool padded with -inf, zero padding to a multiple of 32 at the bottom and
right and a crop back, and the transposed convolution (kernel 2s, stride s, padding s/2) computed
exactly as a 2x2 convolution to s*s*C channels followed by a pixel shuffle.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

OUTPUT_STRIDE = 32
VARIANTS = ("32s", "16s", "8s", "4s")
UPSAMPLERS = ("bilinear", "xavier", "fixed")
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's convention: new = (1 - m) * running + m * batch

# torchvision's conv init: kaiming normal, fan out, ReLU gain (ResNet and MobileNetV2 alike).
_BODY_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's nn.Conv2d default: weight and bias uniform in +-1/sqrt(fan_in).
_SCORE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d``: batch statistics when training, running statistics otherwise.

    The running variance is updated with the unbiased batch variance, as PyTorch does, while the
    normalisation uses the biased one; ``num_batches_tracked`` is kept so state dicts round-trip.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if train:
            mean = x.mean(axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
                unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
                running_var.value = (1 - m) * running_var.value + m * unbiased
                count.value = count.value + 1
            return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        inv = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
        return (x - running_mean.value) * inv + bias


def conv(x: jax.Array, features: int, kernel: int, name: str, *, stride: int = 1, padding: int = 0,
         groups: int = 1, bias: bool = False, kernel_init: Callable = _BODY_INIT) -> jax.Array:
    """``nn.Conv2d`` with PyTorch's explicit symmetric padding."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   feature_group_count=groups, use_bias=bias, kernel_init=kernel_init, name=name)(x)


def conv_bn(x: jax.Array, features: int, kernel: int, conv_name: str, bn_name: str, *, folded: bool,
            train: bool, stride: int = 1, padding: int = 0, groups: int = 1) -> jax.Array:
    """A bias-free convolution and its BatchNorm, or (folded) one convolution with a bias."""
    x = conv(x, features, kernel, conv_name, stride=stride, padding=padding, groups=groups, bias=folded)
    return x if folded else BatchNorm(name=bn_name)(x, train)


class ResNetBlock(nn.Module):
    """torchvision's ``BasicBlock`` (expansion 1) or ``Bottleneck`` (v1.5, expansion 4)."""

    planes: int
    stride: int
    bottleneck: bool
    downsample: bool
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        f, s = self.folded, self.stride
        if self.bottleneck:
            out = nn.relu(conv_bn(x, self.planes, 1, "conv1", "bn1", folded=f, train=train))
            out = nn.relu(conv_bn(out, self.planes, 3, "conv2", "bn2", folded=f, train=train, stride=s, padding=1))
            out = conv_bn(out, self.planes * 4, 1, "conv3", "bn3", folded=f, train=train)
        else:
            out = nn.relu(conv_bn(x, self.planes, 3, "conv1", "bn1", folded=f, train=train, stride=s, padding=1))
            out = conv_bn(out, self.planes, 3, "conv2", "bn2", folded=f, train=train, padding=1)
        identity = x
        if self.downsample:
            identity = conv_bn(x, out.shape[-1], 1, "downsample.0", "downsample.1", folded=f, train=train, stride=s)
        return nn.relu(out + identity)


class ResNetLayer(nn.Module):
    """One of torchvision's ``layer1``..``layer4``: blocks named ``0``, ``1``..."""

    planes: int
    blocks: int
    stride: int
    in_channels: int
    bottleneck: bool
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        expansion = 4 if self.bottleneck else 1
        for i in range(self.blocks):
            stride = self.stride if i == 0 else 1
            downsample = i == 0 and (stride != 1 or self.in_channels != self.planes * expansion)
            x = ResNetBlock(self.planes, stride, self.bottleneck, downsample, self.folded, name=str(i))(x, train)
        return x


RESNET_DEPTHS = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False),
                 "resnet50": ((3, 4, 6, 3), True)}


class ResNetStage8(nn.Module):
    """``nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2)``: keys ``0``, ``1``, ``4``, ``5``.

    Returns ``(c4, c8)``: layer1's output (the stride-4 tap) and layer2's.
    """

    arch: str
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        depths, bottleneck = RESNET_DEPTHS[self.arch]
        e = 4 if bottleneck else 1
        x = nn.relu(conv_bn(x, 64, 7, "0", "1", folded=self.folded, train=train, stride=2, padding=3))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        c4 = ResNetLayer(64, depths[0], 1, 64, bottleneck, self.folded, name="4")(x, train)
        return c4, ResNetLayer(128, depths[1], 2, 64 * e, bottleneck, self.folded, name="5")(c4, train)


class ResNetBody(nn.Module):
    """The ResNet body with taps after layer1, layer2, layer3 and layer4 (strides 4, 8, 16, 32)."""

    arch: str
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        depths, bottleneck = RESNET_DEPTHS[self.arch]
        e = 4 if bottleneck else 1
        c4, c8 = ResNetStage8(self.arch, self.folded, name="stage8")(x, train)
        c16 = ResNetLayer(256, depths[2], 2, 128 * e, bottleneck, self.folded, name="stage16")(c8, train)
        c32 = ResNetLayer(512, depths[3], 2, 256 * e, bottleneck, self.folded, name="stage32")(c16, train)
        return c4, c8, c16, c32


# MobileNetV2 inverted residual settings (expansion t, channels c, repeats n, first stride s).
_MOBILENET_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))
_MOBILENET_STAGE_ENDS = (7, 14, 19)  # as fcnseg.models.backbones: features [0, 7), [7, 14), [14, 19)
_MOBILENET_STAGE4_END = 4  # features[:4] ends at stride 4 (24 channels): the stride-4 tap


def mobilenet_features() -> list[tuple]:
    """``features[i]`` of torchvision's MobileNetV2 as ``("stem"|"block"|"last", in, out, stride, t)``."""
    layers: list[tuple] = [("stem", 3, 32, 2, 1)]
    channels = 32
    for t, c, n, s in _MOBILENET_SETTINGS:
        for i in range(n):
            layers.append(("block", channels, c, s if i == 0 else 1, t))
            channels = c
    layers.append(("last", channels, 1280, 1, 1))
    return layers


class InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``; its ``conv`` Sequential's children keep their indices."""

    in_channels: int
    out_channels: int
    stride: int
    expand: int
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        f, hidden = self.folded, self.in_channels * self.expand
        out, i = x, 0
        if self.expand != 1:
            out = nn.relu6(conv_bn(out, hidden, 1, "conv.0.0", "conv.0.1", folded=f, train=train))
            i = 1
        out = nn.relu6(conv_bn(out, hidden, 3, f"conv.{i}.0", f"conv.{i}.1", folded=f, train=train,
                               stride=self.stride, padding=1, groups=hidden))
        out = conv_bn(out, self.out_channels, 1, f"conv.{i + 1}", f"conv.{i + 2}", folded=f, train=train)
        if self.stride == 1 and self.in_channels == self.out_channels:
            out = x + out
        return out


class MobileNetStage(nn.Module):
    """``features[start:stop]`` of MobileNetV2, children named from 0 as in ``nn.Sequential(*f[a:b])``.

    With ``tap`` set, returns ``(the output of the first tap children, the stage's output)``.
    """

    start: int
    stop: int
    folded: bool = False
    tap: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        tapped = x
        for j, (kind, c_in, c_out, stride, t) in enumerate(mobilenet_features()[self.start:self.stop]):
            if j == self.tap:
                tapped = x
            if kind == "block":
                x = InvertedResidual(c_in, c_out, stride, t, self.folded, name=str(j))(x, train)
            else:
                kernel, pad = (3, 1) if kind == "stem" else (1, 0)
                x = nn.relu6(conv_bn(x, c_out, kernel, f"{j}.0", f"{j}.1", folded=self.folded, train=train,
                                     stride=stride, padding=pad))
        return x if self.tap is None else (tapped, x)


class MobileNetBody(nn.Module):
    """MobileNetV2 ``features`` with taps at strides 4, 8, 16 and 32."""

    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        a, b, c = _MOBILENET_STAGE_ENDS
        c4, c8 = MobileNetStage(0, a, self.folded, _MOBILENET_STAGE4_END, name="stage8")(x, train)
        c16 = MobileNetStage(a, b, self.folded, name="stage16")(c8, train)
        c32 = MobileNetStage(b, c, self.folded, name="stage32")(c16, train)
        return c4, c8, c16, c32


def bilinear_kernel(channels: int, kernel_size: int) -> np.ndarray:
    """`fcnseg.models.upsample.bilinear_kernel` (channel i to channel i), ``(C, C, k, k)`` float32."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = np.arange(kernel_size, dtype=np.float64)
    tent = 1 - np.abs(og - center) / factor
    weight = np.zeros((channels, channels, kernel_size, kernel_size), np.float32)
    weight[range(channels), range(channels)] = np.outer(tent, tent)
    return weight


def symmetric_uniform(bound: float) -> Callable:
    """An initialiser uniform in ``[-bound, bound)``, as torch's default bias init."""
    def make(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return make


def _upsampler_init(init: str) -> Callable:
    def make(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
        if init == "xavier":  # torch's xavier_uniform_ on (C_in, C_out, k, k): fans C * k * k
            fan = shape[1] * shape[2] * shape[3]
            bound = float(np.sqrt(6.0 / (2 * fan)))
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        return jnp.asarray(bilinear_kernel(shape[0], shape[2]), dtype)
    return make


def transposed_conv(x: jax.Array, weight: jax.Array, stride: int) -> jax.Array:
    """``ConvTranspose2d(kernel 2s, stride s, padding s/2)`` of NHWC ``x`` with a PyTorch weight.

    Every output pixel receives exactly 2x2 input pixels, so the layer is a 2x2 convolution (padding
    1) to s*s*C_out channels, one per position in an s x s output cell, then a pixel shuffle and a
    crop of half a cell on each side: the multiply-adds of the transposed convolution, none wasted
    on the zeros that ``lhs_dilation`` would insert.

    Args:
        x: ``(N, H, W, C_in)``.
        weight: ``(C_in, C_out, 2s, 2s)``, the layout of ``nn.ConvTranspose2d.weight``.
        stride: s, even.

    Returns:
        ``(N, H*s, W*s, C_out)``.
    """
    s, (c_in, c_out) = stride, weight.shape[:2]
    weight = weight.astype(x.dtype)
    taps = weight.reshape(c_in, c_out, 2, s, 2, s)[:, :, ::-1, :, ::-1, :]  # (i, o, t_y, r_y, t_x, r_x)
    kernel = taps.transpose(2, 4, 0, 3, 5, 1).reshape(2, 2, c_in, s * s * c_out)
    cells = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    n, hc, wc = cells.shape[:3]
    canvas = cells.reshape(n, hc, wc, s, s, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(n, hc * s, wc * s, c_out)
    h, w, half = x.shape[1], x.shape[2], s // 2
    return canvas[:, half:half + h * s, half:half + w * s]


class Upsampler(nn.Module):
    """`fcnseg.models.upsample.TransposedConvUpsampler`: ``weight`` (C, C, 2s, 2s), optional ``bias``."""

    channels: int
    stride: int
    start: str = "bilinear"  # fcnseg's ``upsampler`` choice (``init`` is Linen's method)
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = 2 * self.stride
        weight = self.param("weight", _upsampler_init(self.start), (self.channels, self.channels, k, k))
        if self.start == "fixed":  # the paper's ablation: bilinear, never learned
            weight = jax.lax.stop_gradient(weight)
        out = transposed_conv(x, weight, self.stride)
        if self.use_bias:
            # torch's _ConvNd default for ConvTranspose2d's bias: fan_in = weight.size(1) * k * k
            out = out + self.param("bias", symmetric_uniform(1.0 / float(np.sqrt(self.channels * k * k))),
                                   (self.channels,))
        return out


class FCN(nn.Module):
    """FCN-32s/16s/8s/4s; ``__call__`` maps NHWC images ``(N, H, W, 3)`` to logits ``(N, H, W, C)``.

    Attributes mirror `fcnseg.models.fcn.FCN` and its builders' arguments; ``folded`` selects the
    inference form (no BatchNorm; only for prediction).
    """

    backbone: str
    num_classes: int
    variant: str = "32s"
    upsampler: str = "bilinear"
    upsampler_bias: bool = False
    freeze_backbone: bool = False
    folded: bool = False

    @nn.compact
    def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
        h, w = image.shape[1:3]
        pad_h, pad_w = (-h) % OUTPUT_STRIDE, (-w) % OUTPUT_STRIDE
        padded = jnp.pad(image, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        if self.backbone == "mobilenet_v2":
            body = MobileNetBody(self.folded, name="backbone")
        else:
            body = ResNetBody(self.backbone, self.folded, name="backbone")
        features = body(padded, train and not self.freeze_backbone)
        if self.freeze_backbone:
            features = jax.lax.stop_gradient(features)
        return _head(self, *features)[:, :h, :w]


def _head(fcn: FCN, c4: jax.Array, c8: jax.Array, c16: jax.Array, c32: jax.Array) -> jax.Array:
    """Scores and upsamplers (created inside `FCN.__call__`, so they are the FCN's children)."""
    c, init = fcn.num_classes, fcn.upsampler
    score = nn.Conv(c, (1, 1), kernel_init=_SCORE_INIT, bias_init=symmetric_uniform(1.0 / float(np.sqrt(c32.shape[-1]))),
                    name="score32")(c32)
    if fcn.variant != "32s":
        score = Upsampler(c, 2, init, name="upsample32to16")(score) + _zero_conv(c16, c, "score16")
    if fcn.variant in ("8s", "4s"):
        score = Upsampler(c, 2, init, name="upsample16to8")(score) + _zero_conv(c8, c, "score8")
    if fcn.variant == "4s":
        score = Upsampler(c, 2, init, name="upsample8to4")(score) + _zero_conv(c4, c, "score4")
    stride = {"32s": 32, "16s": 16, "8s": 8, "4s": 4}[fcn.variant]
    return Upsampler(c, stride, init, fcn.upsampler_bias, name="upsample_final")(score)


def _zero_conv(x: jax.Array, features: int, name: str) -> jax.Array:
    """The skip scores start at zero: a fresh 16s/8s/4s predicts what the coarser variant it extends does."""
    return nn.Conv(features, (1, 1), kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                   name=name)(x)
