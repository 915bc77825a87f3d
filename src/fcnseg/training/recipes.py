"""Named recipes: the chapter's setting in its three editions, so a reader can compare with its printout.

A recipe is a set of `TrainConfig` field values applied over the defaults (``--recipe NAME``); a
config file and options given on the command line override it. The d2l recipes train the chapter's
net (FCN-32s on ResNet-18, a bias on the transposed convolution), read VOC's void border as
background and drop images smaller than the crop as the chapter does, and log the chapter's metrics
(``d2l_metrics``: train loss, train accuracy, test accuracy on random crops, examples/sec). Their
batch of 32 is the global batch: under torchrun each of W processes takes 32 / W (``global_batch``).
"""
from __future__ import annotations

from typing import Any

# The PyTorch edition (d2l.ai, "Fully Convolutional Networks"): SGD lr 0.001, wd 1e-3, no momentum,
# the loss `F.cross_entropy(reduction='none').mean(1).mean(1)` summed by `l.sum().backward()`.
_D2L: dict[str, Any] = {
    "model": "fcn_resnet18",
    "variant": "32s",
    "upsampler": "bilinear",
    "upsampler_bias": True,
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.0,
    "weight_decay": 1e-3,
    "batch_size": 32,
    "global_batch": True,
    "epochs": 5,
    "crop": (320, 480),
    "scale_range": None,
    "hflip": False,
    "schedule": "constant",
    "loss_reduction": "d2l",
    "drop_small": True,
    "border_as_background": True,
    "amp": "none",
    "channels_last": False,
    "d2l_metrics": True,
}

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "d2l": _D2L,
    # The MXNet edition: the 1x1 convolution Xavier-initialised (`init.Xavier()`: uniform, gain 1,
    # bias zero), lr 0.1, and the loss averaged over the batch (`trainer.step(batch_size)` divides the
    # summed gradient by the batch). With the border read as background every pixel is labelled and
    # the crops are equal-sized, so the mean over the batch's pixels ("mean") is that same average of
    # per-example means.
    "d2l-mxnet": {**_D2L, "score_init": "xavier", "lr": 0.1, "loss_reduction": "mean"},
    # The JAX edition as issue 18 describes it: the body from random initialisation, SGD with
    # momentum 0.9, mean loss; the learning rate (0.01) is fcnseg's choice, none being published here.
    "d2l-jax": {**_D2L, "weights_backbone": None, "momentum": 0.9, "lr": 0.01, "loss_reduction": "mean"},
}
