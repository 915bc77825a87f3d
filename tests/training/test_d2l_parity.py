"""Proof of equality, step by step: ``--recipe d2l`` trains the chapter's net as the chapter does.

The chapter ("Fully Convolutional Networks", Dive into Deep Learning, PyTorch edition) is written out
here from its text, not imported: the ``d2l`` package (1.0.3, installed with ``pip install --no-deps``)
does not import without pandas, requests, IPython, matplotlib_inline and scipy, and it does not hold
the chapter's FCN anyway (``bilinear_kernel``, the net, its loss and ``predict`` live in the chapter's
notebook, not in the library; only ``train_batch_ch13`` is, and its steps are copied below).

The chapter's net and fcnseg's ``fcn_resnet18`` (32s, bilinear upsampler with a bias) start from the
same weights (torchvision's plain random initialisation: ImageNet's cannot be downloaded here) and
see the same batches; the loss of each of 5 SGD steps agrees within 1e-5 relative (measured: at
most 5.5e-8), and the predictions after are the same at every pixel. What differs is only how the
numbers are computed: fcnseg runs the transposed convolution as a sub-pixel GEMM and fuses it with
the cross-entropy (the path ``fcnseg train --recipe d2l`` takes), so the two differ by float
rounding, not by what they compute.

Both bodies run in float64 (see `to_float64`); fcnseg's fused upsampling and loss run in float32
as in every training run.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fcnseg
from fcnseg.training.config import resolve_config
from fcnseg.training.loss import fcn_cross_entropy
from fcnseg.training.optim import build_optimizer
from fcnseg.training.step import train_step

NUM_CLASSES = 21
CROP = (320, 480)  # the chapter's crop_size
STEPS = 5  # about 2.5 s each here; the loss already falls over them (asserted below)
BATCH = 2  # the chapter's is 32; 2 keeps the steps of two ResNet-18s on 2 CPU cores within seconds
LOSS_RTOL = 1e-5
CHAPTER_PARAMETERS = 12_993_642  # the chapter's net for 21 classes (ConvTranspose2d with its bias)


# -- the chapter, as it is written -----------------------------------------------------------------

def bilinear_kernel(in_channels, out_channels, kernel_size):
    """The chapter's ``bilinear_kernel``, verbatim."""
    factor = (kernel_size + 1) // 2
    if kernel_size % 2 == 1:
        center = factor - 1
    else:
        center = factor - 0.5
    og = (torch.arange(kernel_size).reshape(-1, 1),
          torch.arange(kernel_size).reshape(1, -1))
    filt = (1 - torch.abs(og[0] - center) / factor) * \
           (1 - torch.abs(og[1] - center) / factor)
    weight = torch.zeros((in_channels, out_channels,
                          kernel_size, kernel_size))
    weight[range(in_channels), range(out_channels), :, :] = filt
    return weight


def chapter_net(num_classes: int = NUM_CLASSES) -> tuple[nn.Sequential, nn.Module]:
    """The chapter's net, and the torchvision ResNet-18 whose body it shares.

    The chapter loads ``torchvision.models.resnet18(pretrained=True)``; ImageNet weights cannot be
    downloaded here; both nets start from the same random ones instead (compared in float64: `to_float64`).
    """
    pretrained_net = torchvision.models.resnet18()
    net = nn.Sequential(*list(pretrained_net.children())[:-2])
    net.add_module('final_conv', nn.Conv2d(512, num_classes, kernel_size=1))
    net.add_module('transpose_conv', nn.ConvTranspose2d(num_classes, num_classes,
                                                        kernel_size=64, padding=16, stride=32))
    W = bilinear_kernel(num_classes, num_classes, 64)
    net.transpose_conv.weight.data.copy_(W)
    return net, pretrained_net


def to_float64(*modules: nn.Module) -> None:
    """Puts the nets' weights (both bodies and heads) in float64; inputs follow.

    From ImageNet weights (the chapter's start) float32 would do; from a random start it cannot
    show equality at all: a freshly initialised ResNet-18 in training mode is chaotic, and in
    float32 the chapter's own net against a copy whose weights differ by 1e-7 relative (float
    rounding) drifts apart to 2.4e-4 relative in the loss by step 10 (batch 4: 3.7e-4), so no two
    implementations could be compared at 1e-5. In float64 the bodies' rounding is 1e-16 and the
    only float32 left is what fcnseg computes in float32 in every run (the fused transposed
    convolution and cross-entropy, `fcnseg.ops.fused_loss`): the comparison then measures fcnseg's
    computation, not the chaos.
    """
    for module in modules:
        module.double()


def loss(inputs, targets):
    """The chapter's loss: each example's mean over its pixels."""
    return F.cross_entropy(inputs, targets, reduction='none').mean(1).mean(1)


def train_batch_ch13(net, X, y, loss, trainer, devices):
    """``d2l.train_batch_ch13`` (d2l 1.0.3, torch.py), verbatim but for its branch for list inputs
    and the accuracy it also returns."""
    X = X.to(devices[0])
    y = y.to(devices[0])
    net.train()
    trainer.zero_grad()
    pred = net(X)
    l = loss(pred, y)  # noqa: E741 - the chapter's name
    l.sum().backward()
    trainer.step()
    train_loss_sum = l.sum()
    return train_loss_sum


# -- fcnseg's side: the recipe's model, optimiser and step -----------------------------------------

def d2l_config():
    return resolve_config({}, recipe="d2l", require_root=False)


def fcnseg_model(config) -> fcnseg.FCN:
    """``--recipe d2l``'s model as `Trainer.set_up_model` builds it (ResNet-18 FCN-32s, bilinear
    upsampler with the chapter's bias), from random weights: the chapter's are copied in."""
    return fcnseg.build_model(config.model, variant=config.variant, num_classes=NUM_CLASSES,
                              weights_backbone=None, upsampler=config.upsampler,
                              upsampler_bias=config.upsampler_bias, freeze_backbone=config.freeze_backbone)


def copy_chapter_weights(net: nn.Sequential, pretrained_net: nn.Module, model: fcnseg.FCN) -> None:
    """Maps the chapter net's state dict onto fcnseg's, every parameter and buffer, strictly.

    The chapter's ``Sequential`` numbers ResNet-18's children 0..7 (conv1, bn1, relu, maxpool,
    layer1..4); fcnseg's body reads torchvision's names. ``final_conv`` is fcnseg's ``score32``,
    ``transpose_conv`` its ``upsample_final`` (the weight has ConvTranspose2d's shape).
    """
    names = [name for name, _ in pretrained_net.named_children()]
    body, head = {}, {"final_conv": {}, "transpose_conv": {}}
    for key, value in net.state_dict().items():
        first, rest = key.split(".", 1)
        if first in head:
            head[first][rest] = value
        else:
            body[f"{names[int(first)]}.{rest}"] = value
    model.backbone.load_torchvision_state_dict(body)
    model.score32.load_state_dict(head["final_conv"], strict=True)
    model.upsample_final.load_state_dict(head["transpose_conv"], strict=True)


def make_batches(count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised-looking images of 320x480 whose pixels' colours depend on their class, labels 0..20.

    No void: the chapter reads VOC's border as background (its colormap maps it to 0), so its
    labels are always 0..20.
    """
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(NUM_CLASSES, 3, generator=g)
    batches = []
    for _ in range(count):
        coarse = torch.randint(0, NUM_CLASSES, (batch, CROP[0] // 16, CROP[1] // 16), generator=g)
        y = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)
        x = colours[y].permute(0, 3, 1, 2) + 0.7 * torch.randn(batch, 3, *CROP, generator=g)
        batches.append((x.contiguous(), y))
    return batches


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b))


@pytest.fixture(scope="module")
def nets():
    """The chapter's net and fcnseg's recipe model, with equal weights (torchvision's random
    initialisation), both untrained, in float64."""
    torch.manual_seed(0)
    net, pretrained_net = chapter_net()
    model = fcnseg_model(d2l_config())
    copy_chapter_weights(net, pretrained_net, model)
    to_float64(net, model)
    return net, model


def test_the_recipe_is_the_chapters_setting():
    config = d2l_config()
    assert (config.model, config.variant, config.upsampler) == ("fcn_resnet18", "32s", "bilinear")
    assert (config.optimizer, config.lr, config.momentum, config.weight_decay) == ("sgd", 1e-3, 0.0, 1e-3)
    assert (config.batch_size, config.epochs, tuple(config.crop)) == (32, 5, CROP)
    assert (config.loss_reduction, config.amp, config.channels_last) == ("d2l", "none", False)
    assert config.upsampler_bias is True and config.freeze_backbone is False


def test_same_model_same_parameter_count_same_forward(nets):
    net, model = nets
    assert sum(p.numel() for p in net.parameters()) == CHAPTER_PARAMETERS
    assert sum(p.numel() for p in model.parameters()) == CHAPTER_PARAMETERS
    assert torch.equal(model.upsample_final.weight, bilinear_kernel(NUM_CLASSES, NUM_CLASSES, 64).double())
    x, _ = make_batches(1, 1, seed=3)[0]
    x = x.double()
    with torch.no_grad():
        ours, theirs = model.eval()(x), net.eval()(x)
    assert ours.shape == theirs.shape == (1, NUM_CLASSES, *CROP)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)  # float32 upsampling: rounding


def run_both(net: nn.Sequential, model: fcnseg.FCN, batches) -> tuple[list[float], list[float]]:
    """STEPS SGD steps of each: the chapter's ``train_batch_ch13``, fcnseg's ``train_step`` as the recipe runs it."""
    cpu = torch.device("cpu")
    trainer = torch.optim.SGD(net.parameters(), lr=0.001, weight_decay=1e-3)
    config = d2l_config()
    optimizer = build_optimizer(config, model)
    compute_loss = functools.partial(fcn_cross_entropy, model, reduction=config.loss_reduction)
    chapter_losses, fcnseg_losses = [], []
    for x, y in batches:
        x = x.double()
        chapter_losses.append(train_batch_ch13(net, x, y, loss, trainer, [cpu]).item())
        model.train()
        result = train_step(model, [(x, y)], optimizer, device=cpu, amp_dtype=None,
                            channels_last=config.channels_last, loss_reduction=config.loss_reduction,
                            compute_loss=compute_loss)
        fcnseg_losses.append(result.loss)
    return chapter_losses, fcnseg_losses


@pytest.fixture(scope="module")
def trained(nets):
    """Both nets after STEPS steps on the same STEPS batches, and the losses each step reported."""
    net, model = nets
    initial_bias = model.upsample_final.bias.detach().clone()
    chapter_losses, fcnseg_losses = run_both(net, model, make_batches(STEPS, BATCH, seed=1))
    assert not torch.equal(model.upsample_final.bias, initial_bias)  # the bias trains
    return net, model, chapter_losses, fcnseg_losses


def test_same_loss_at_every_step(trained):
    """The chapter's ``l.sum()`` (each example's mean pixel loss, summed over the batch) and
    fcnseg's step loss (reduction "d2l", the same sum) agree within 1e-5 relative at each step."""
    _, _, chapter_losses, fcnseg_losses = trained
    gaps = [relative_gap(a, b) for a, b in zip(chapter_losses, fcnseg_losses)]
    report = ", ".join(f"{a:.6f}/{b:.6f} ({g:.1e})" for a, b, g in zip(chapter_losses, fcnseg_losses, gaps))
    print(f"\nchapter/fcnseg loss per step (relative gap): {report}")
    assert len(gaps) == STEPS
    assert max(gaps) <= LOSS_RTOL, report
    assert fcnseg_losses[-1] < fcnseg_losses[0]  # it learns: the steps are not all no-ops


def test_same_weights_after_training(trained):
    net, model, _, _ = trained
    torch.testing.assert_close(model.score32.weight, net.final_conv.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.upsample_final.weight, net.transpose_conv.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.upsample_final.bias, net.transpose_conv.bias, rtol=1e-4, atol=1e-6)


def test_same_predictions_after_training(trained):
    """The same class at every pixel after STEPS steps, and logits equal to float32 rounding (the
    fused upsampling computes in float32: measured 5.9e-7, logit std 0.24)."""
    net, model, _, _ = trained
    x, _ = make_batches(1, BATCH, seed=2)[0]
    x = x.double()
    with torch.no_grad():
        theirs = net.eval()(x)
        ours = model.eval()(x)
    gap = (ours - theirs).abs().amax().item()
    differ = ours.argmax(dim=1) != theirs.argmax(dim=1)
    print(f"\nafter {STEPS} steps: {int(differ.sum())} of {differ.numel()} pixels differ in class; largest logit "
          f"difference {gap:.1e}; logit std {theirs.std().item():.2f}")
    assert gap < 1e-5
    assert not differ.any()
