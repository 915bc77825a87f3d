"""An FCN in the form that predicts fastest: BatchNorm folded into its convolutions, channels-last memory.

In eval mode a BatchNorm is a fixed per-channel affine map, so it can be merged into the weights
and bias of the convolution before it (torch's ``fuse_conv_bn_eval``), which saves a pass over
every feature map. Together with channels-last memory (oneDNN's preferred layout on CPUs, and
tensor cores' on CUDA) this made fp32 whole-image prediction 1.2-1.3x faster than the model as
built, at batch 1 and 8 on a 2-core CPU (docs/BENCHMARKS.md, rows ``fp32`` and ``fp32-cl-fold``).
The result is for inference only: folded weights no longer train as the original model does.
Only Conv2d/BatchNorm pairs change: the upsamplers, with the final one's bias if it has one, are
kept as they are.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fcnseg.models.fcn import FCN


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


def inference_form(model: nn.Module, *, copy_model: bool = True) -> nn.Module:
    """An fcnseg `FCN` in eval mode, BatchNorm folded into its convolutions, in channels-last memory.

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
        fold_batchnorm(model.eval())
    return model.to(memory_format=torch.channels_last)


__all__ = ["fold_batchnorm", "inference_form"]
