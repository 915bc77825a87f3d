"""The chapter's ``predict`` against fcnseg's on whole images: the same label maps.

The chapter's net is built as the chapter writes it (`tests.training.test_d2l_parity`), fcnseg's
``--recipe d2l`` model receives its weights, and both predict the same uint8 images: the chapter
through its ``predict`` (``test_iter.dataset.normalize_image``, one forward pass, argmax), fcnseg
through `fcnseg.inference.predict_whole` and `fcnseg.Segmenter` (float32, ``amp="none"``).

On the chapter's 320x480 crops (``crop_rect = (0, 0, 320, 480)``) the two compute the same function;
on a whole VOC image (375x500, not a multiple of 32) they do not quite, see
`test_whole_voc_image_of_375x500`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import fcnseg
from fcnseg.inference import predict_whole
from tests.training.test_d2l_parity import (
    NUM_CLASSES,
    chapter_net,
    copy_chapter_weights,
    d2l_config,
    fcnseg_model,
)

CROP_RECT = (0, 0, 320, 480)  # the chapter's crop_rect
VOC_SIZE = (375, 500)
VOC_WITH_SIZE = "2011_000006"  # 500x375, the common VOC size (2011_000025, 2011_003066 too)
# How far in from the bottom and right edges padding differences reach (see the 375x500 test).
EDGE_BAND = 7 * 32


# -- the chapter, as it is written -----------------------------------------------------------------

_normalize = torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def normalize_image(img):
    """``VOCSegDataset.normalize_image`` (d2l 1.0.3), which the chapter's ``predict`` calls."""
    return _normalize(img.float() / 255)


def predict(net, img):
    """The chapter's ``predict`` (on the CPU, without gradients; its net is in eval mode after
    ``train_ch13``, whose accuracy evaluation leaves it there)."""
    with torch.no_grad():
        X = normalize_image(img).unsqueeze(0)
        pred = net(X).argmax(dim=1)
    return pred.reshape(pred.shape[1], pred.shape[2])


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nets():
    """The chapter's net and fcnseg's recipe model with its weights, in eval mode.

    The untrained head scores classes from a random body; its logits spread by about 0.3, so the
    comparison is of the computation, not of a few confident pixels.
    """
    torch.manual_seed(0)
    net, pretrained_net = chapter_net()
    model = fcnseg_model(d2l_config())
    copy_chapter_weights(net, pretrained_net, model)
    return net.eval(), model.eval()


def smooth_images(count: int, size: tuple[int, int], seed: int) -> list[torch.Tensor]:
    """uint8 ``(3, H, W)`` images with photo-like smooth structure (as ``read_image`` returns them)."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        coarse = torch.rand(1, 3, size[0] // 20, size[1] // 20, generator=g)
        image = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
        image = image + 0.05 * torch.randn(3, *size, generator=g)
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
    return images


def read_image(path) -> torch.Tensor:
    """As ``torchvision.io.read_image`` (the chapter's reader): uint8 ``(3, H, W)`` RGB."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def segmenter(model, **kwargs) -> fcnseg.Segmenter:
    classes = [f"class {i}" for i in range(NUM_CLASSES)]
    colors = [(i, i, i) for i in range(NUM_CLASSES)]
    return fcnseg.Segmenter(model, classes, colors, device="cpu", amp="none", backend="torch", **kwargs)


def fcnseg_whole(model, img: torch.Tensor) -> torch.Tensor:
    """`predict_whole` on the image normalised by fcnseg (`Segmenter.preprocess`)."""
    x = segmenter(model, optimize=False).preprocess(img).unsqueeze(0)
    return predict_whole(model, x)[0].argmax(0)


# -- 320x480: the chapter's crops ------------------------------------------------------------------

def crops() -> list[torch.Tensor]:
    crop = torchvision.transforms.functional.crop
    return [crop(img, *CROP_RECT) for img in smooth_images(2, VOC_SIZE, seed=4)]


def chapter_logits(net, img: torch.Tensor) -> torch.Tensor:
    """The logits under the chapter's ``predict``'s argmax: ``(C, H, W)``."""
    with torch.no_grad():
        return net(normalize_image(img).unsqueeze(0))[0]


def assert_same_but_for_ties(ours: np.ndarray, logits: torch.Tensor, what: str) -> None:
    """``ours`` is the chapter's argmax of ``logits`` except at under 1e-4 of the pixels, each one where
    the chapter's two best classes lie within float rounding (1e-4) of each other."""
    theirs = logits.argmax(0).numpy()
    top2 = logits.topk(2, dim=0).values
    margin = (top2[0] - top2[1]).numpy()
    differ = ours != theirs
    print(f"\n{what} vs chapter: {1 - differ.mean():.6%} of {differ.size} pixels agree; "
          f"largest margin where they differ {margin[differ].max() if differ.any() else 0:.1e}")
    assert ours.shape == theirs.shape
    assert differ.mean() < 1e-4
    assert (margin[differ] < 1e-4).all()


def test_same_label_maps_on_the_chapters_crops(nets):
    """``predict_whole`` and a Segmenter predicting with the model as given (``optimize=False``)
    give the chapter's label map: at 320x480 nothing is padded, and the only difference, the
    transposed convolution computed as a sub-pixel GEMM, is float rounding, which can flip a pixel
    only where the chapter's two best classes tie within it (identical maps on an AVX-512 host; one
    such pixel on an AVX2 host, whose oneDNN kernels round differently)."""
    net, model = nets
    for img in crops():
        theirs = predict(net, img)
        assert theirs.shape == (320, 480)
        logits = chapter_logits(net, img)
        assert torch.equal(logits.argmax(0), theirs)  # the logits checked are those predict's argmax reads
        assert_same_but_for_ties(fcnseg_whole(model, img).numpy(), logits, "predict_whole")
        assert_same_but_for_ties(segmenter(model, optimize=False).predict(img), logits, "Segmenter(optimize=False)")


def test_segmenter_inference_form_agrees_but_for_ties(nets):
    """The default Segmenter predicts with BatchNorm folded into the convolutions and channels-last
    memory: the same logits up to float rounding, so the same class except where the chapter's two
    best classes are within that rounding of each other."""
    net, model = nets
    seg = segmenter(model)  # optimize=True: the form `fcnseg predict` runs
    for img in crops():
        assert_same_but_for_ties(seg.predict(img), chapter_logits(net, img), "Segmenter (inference form)")


# -- a whole VOC image: 375x500 --------------------------------------------------------------------

def test_whole_voc_image_of_375x500(nets, voc_sample):
    """The chapter's net on a whole 375x500 image outputs 384x512, fcnseg's 375x500; on the common
    375x500 pixels they agree except in a band along the bottom and right edges.

    The chapter's body convolves the 375 rows as they are: ResNet-18 takes 375 -> 188 -> 94 -> 47
    -> 24 -> 12 rows (500 -> 250 -> 125 -> 63 -> 32 -> 16 columns) and the transposed convolution
    returns ``(12 - 1) * 32 - 2 * 16 + 64 = 384`` rows (512 columns), so its ``predict`` returns a
    384x512 label map whose last 9 rows and 12 columns lie outside the image (the chapter's own
    demo predicts 320x480 crops, where this does not arise). fcnseg pads the normalised image with
    zeros to 384x512, runs the same layers and crops the logits to 375x500. The first convolution
    pads with the same zeros, so the two agree up to the stride-4 maps; from there the chapter's maps
    are smaller (94 x 125 rows x columns against 96 x 128, 47 x 63 against 48 x 64) and its 3x3
    convolutions read zero padding where fcnseg's read the features of the padded band. Each
    convolution carries that difference one row of its map further in, so it reaches about seven
    stride-32 cells from the bottom and right edges. Measured with this test's weights: logits equal
    to 5e-6 in rows 0-159 and columns 0-287, label maps identical there, 97.6% of all common pixels
    agree. Asserted: identical beyond ``EDGE_BAND`` (224 px) from the bottom and right edges.

    Which is right is a matter of definition: fcnseg's output covers exactly the image and its
    every 32x32 cell sees the same arithmetic wherever it lies; the chapter's, for sizes that are
    not multiples of 32, does not cover the image pixel for pixel (a 384x512 map for a 375x500 image).
    """
    path = voc_sample / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{VOC_WITH_SIZE}.jpg"
    img = read_image(path)
    assert tuple(img.shape[-2:]) == VOC_SIZE
    net, model = nets
    theirs = predict(net, img)
    assert theirs.shape == (384, 512)
    ours = fcnseg_whole(model, img)
    assert ours.shape == VOC_SIZE
    assert np.array_equal(segmenter(model, optimize=False).predict(img), ours.numpy())
    common = theirs[: VOC_SIZE[0], : VOC_SIZE[1]]
    differ = ours != common
    print(f"\n375x500: {1 - differ.double().mean().item():.4%} of the common pixels agree")
    interior = (slice(0, VOC_SIZE[0] - EDGE_BAND), slice(0, VOC_SIZE[1] - EDGE_BAND))
    assert torch.equal(ours[interior], common[interior])
    assert differ.double().mean().item() < 0.1
    # The chapter's crops of that image (its own test-time input) are identical, as above.
    crop = torchvision.transforms.functional.crop(img, *CROP_RECT)
    assert torch.equal(fcnseg_whole(model, crop), predict(net, crop))

