"""An FCN in the form that predicts fastest: BatchNorm folded into its convolutions, activations fused
with them, channels-last memory.

In eval mode a BatchNorm is a fixed per-channel affine map, so it can be merged into the weights
and bias of the convolution before it (torch's ``fuse_conv_bn_eval``), which saves a pass over
every feature map. Together with channels-last memory (oneDNN's preferred layout on CPUs, and
tensor cores' on CUDA) this made fp32 whole-image prediction 1.2-1.3x faster than the model as
built, at batch 1 and 8 on a 2-core CPU (docs/BENCHMARKS.md, rows ``fp32`` and ``fp32-cl-fold``).
The result is for inference only: folded weights no longer train as the original model does.
Only Conv2d/BatchNorm pairs change: the upsamplers, with the final one's bias if it has one, are
kept as they are. On CPU, a convolution followed by its ReLU or ReLU6 in a Sequential (MobileNetV2's
35 blocks, ResNet's stem) then runs as one oneDNN convolution with the activation as a post-op
(`ConvActivation`), as torch.compile's CPU backend emits it: the activation no longer reads and
writes the feature map again (14% of a bf16 MobileNetV2 forward at 360x480 here).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fcnseg.models.depthwise_conv import StridedDepthwiseConv2d
from fcnseg.models.fcn import FCN
from fcnseg.runtime import native_cpu_bf16

# oneDNN's convolution with an elementwise post-op: the operator torch.compile's CPU backend emits for
# conv + ReLU; torch has no public eager form of it. None where this torch build lacks it.
_CONV_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
# The activations it fuses: oneDNN's post-op name and its scalars.
_POST_OPS: dict[type, tuple[str, list[float]]] = {nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0])}


class ConvActivation(nn.Conv2d):
    """A Conv2d and the activation after it, as one oneDNN operation on CPU; elsewhere the two modules.

    It holds the convolution's own parameters (the state dict is the convolution's), and the
    activation as a child. Under CPU autocast it computes in the autocast dtype, as ``conv2d`` would,
    from weights cast once and kept (the inference form's weights do not change).
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self.weight, self.bias, self.activation = conv.weight, conv.bias, activation
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if (_CONV_POINTWISE is None or x.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16)
                or (dtype == torch.bfloat16 and not native_cpu_bf16())  # oneDNN refuses bf16 there
                or self.padding_mode != "zeros" or isinstance(self.padding, str) or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            return self.activation(super().forward(x))
        weight, bias = self._weights(dtype)
        post_op, scalars = _POST_OPS[type(self.activation)]
        return _CONV_POINTWISE(x.to(dtype), weight, bias, list(self.padding), list(self.stride), list(self.dilation),
                               self.groups, post_op, scalars, "")

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        if dtype == self.weight.dtype:
            return self.weight, self.bias
        if dtype not in self._cast:
            self._cast[dtype] = (self.weight.detach().to(dtype),
                                 None if self.bias is None else self.bias.detach().to(dtype))
        return self._cast[dtype]


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Folds, in place, every BatchNorm2d registered right after a Conv2d into that convolution.

    The pairing follows registration order, which is the order of ``forward`` in torchvision's
    ResNets and MobileNetV2 (the bodies fcnseg builds; ``tests/models/test_inference_form.py``
    checks each). The BatchNorm is replaced by ``nn.Identity``.

    Args:
        module: a model in eval mode (running statistics are what gets folded).

    Returns:
        ``module`` itself.
    """
    if module.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: training BatchNorm uses batch statistics")
    names = list(module._modules)
    for name in names:
        child = module._modules[name]
        if child is not None:
            fold_batchnorm(child)
    for first, second in zip(names, names[1:]):
        conv, norm = module._modules[first], module._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
            module._modules[first] = fuse_conv_bn_eval(conv, norm)
            module._modules[second] = nn.Identity()
    return module


def fuse_activations(module: nn.Module) -> nn.Module:
    """Replaces, in place, each Conv2d followed in a Sequential by a ReLU or ReLU6 (BatchNorm folded
    away in between, as an Identity) with a `ConvActivation`, and the activation with an Identity.

    Only in Sequentials, whose forward runs each child once in order (ResNet's blocks, which are
    not, apply their ReLU again after the residual sum), and only activations registered once in
    ``module``, so that no other caller of the same module loses it. Returns ``module``.
    """
    uses: dict[int, int] = {}
    for _, child in module.named_modules(remove_duplicate=False):
        uses[id(child)] = uses.get(id(child), 0) + 1
    for sequential in [m for m in module.modules() if type(m).forward is nn.Sequential.forward]:
        names = list(sequential._modules)
        for index, name in enumerate(names):
            conv = sequential._modules[name]
            if type(conv) not in (nn.Conv2d, StridedDepthwiseConv2d):  # no subclass that changes the computation
                continue
            after = index + 1
            while after < len(names) and isinstance(sequential._modules[names[after]], nn.Identity):
                after += 1
            activation = sequential._modules[names[after]] if after < len(names) else None
            if type(activation) in _POST_OPS and uses[id(activation)] == 1:
                sequential._modules[name] = ConvActivation(conv, activation)
                sequential._modules[names[after]] = nn.Identity()
    return module


def unfuse_activations(module: nn.Module) -> nn.Module:
    """Replaces, in place, each `ConvActivation` with a Sequential of a plain Conv2d (sharing its
    parameters) and its activation: the undoing of `fuse_activations` for tools that recognise
    layers by module type, as torchao's X86InductorQuantizer does (Conv2d then ReLU/ReLU6; a fused
    layer it leaves in float32: 35 of MobileNetV2 FCN-4s's 56 convolutions). Returns ``module``."""
    for name, child in list(module.named_children()):
        if isinstance(child, ConvActivation):
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                             child.dilation, child.groups, child.bias is not None, child.padding_mode, device="meta")
            conv.weight, conv.bias = child.weight, child.bias
            setattr(module, name, nn.Sequential(conv, child.activation))
        else:
            unfuse_activations(child)
    return module


def inference_form(model: nn.Module, *, copy_model: bool = True) -> nn.Module:
    """An fcnseg `FCN` in eval mode, BatchNorm folded into its convolutions, activations fused with them
    (`fuse_activations`), in channels-last memory.

    Args:
        model: an `FCN`. Any other module is returned as it is: folding by registration order is
            only known to be exact for the bodies fcnseg builds.
        copy_model: work on a deep copy and leave ``model`` as it is (False changes it in place).

    Returns:
        A module computing the same logits as ``model.eval()`` up to float rounding.
    """
    if not isinstance(model, FCN):
        return model
    model = copy.deepcopy(model) if copy_model else model
    with torch.no_grad():
        fuse_activations(fold_batchnorm(model.eval()))
    return model.to(memory_format=torch.channels_last)


__all__ = ["ConvActivation", "fold_batchnorm", "fuse_activations", "inference_form", "unfuse_activations"]
