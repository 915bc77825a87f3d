"""The FCN family: shapes for any input size, the skip architecture's start, freezing, backward."""
from __future__ import annotations

import pytest
import torch

from fcnseg import build_model, fcn_mobilenet_v2, fcn_resnet18, list_models
from fcnseg.models import VARIANTS
from fcnseg.models.upsample import TransposedConvUpsampler


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(320, 480), (375, 500), (67, 93), (1, 1), (33, 100)])
def test_output_has_exactly_the_input_size(variant, size):
    model = fcn_resnet18(variant=variant, num_classes=3, weights_backbone=None).eval()
    with torch.no_grad():
        logits = model(torch.randn(2 if size == (67, 93) else 1, 3, *size))
    assert logits.shape == (2 if size == (67, 93) else 1, 3, *size)


@pytest.mark.parametrize("name", ["fcn_resnet34", "fcn_resnet50", "fcn_mobilenet_v2"])
def test_siblings_build_and_run(name):
    model = build_model(name, variant="8s", num_classes=4, weights_backbone=None).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 4, 64, 96)


@pytest.mark.parametrize("variant,skip,stride", [("4s", "score4", 4), ("2s", "score2", 2)])
@pytest.mark.parametrize("name", ["fcn_resnet18", "fcn_resnet34", "fcn_resnet50", "fcn_mobilenet_v2"])
def test_fine_variants_forward_and_backward_on_every_body_at_an_odd_size(name, variant, skip, stride):
    torch.manual_seed(0)
    model = build_model(name, variant=variant, num_classes=3, weights_backbone=None).train()
    up = model.upsample_final
    assert (up.kernel_size, up.stride, up.padding) == (2 * stride, stride, stride // 2)
    assert model.upsample8to4.stride == 2
    assert getattr(model, skip).in_channels == model.backbone.channels[-1 - model.skips]
    with torch.no_grad():  # make the new skips count, so their gradient paths are exercised
        model.score4.weight.normal_(std=0.1)
        getattr(model, skip).weight.normal_(std=0.1)
    image = torch.randn(2, 3, 37, 45)  # padded to 64 x 64 inside, cropped back
    logits = model(image)
    assert logits.shape == (2, 3, 37, 45)
    logits.logsumexp(1).mean().backward()
    first_conv = next(p for n, p in model.backbone.stage8.named_parameters() if n.endswith("weight"))
    for param in (f"{skip}.weight", "upsample8to4.weight", "score8.weight", "score32.weight", "upsample_final.weight"):
        grad = model.get_parameter(param).grad
        assert grad is not None and torch.count_nonzero(grad) > 0, param
    assert first_conv.grad is not None and torch.count_nonzero(first_conv.grad) > 0


def test_body_taps_strides_2_4_8_16_32_and_the_2s_head_reads_all_five():
    model = fcn_resnet18(variant="2s", num_classes=2, weights_backbone=None).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        c2, c4, c8, c16, c32 = model.backbone(image)
        body = model.backbone.stage8  # c2 is the stem's ReLU, c4 layer1's output (after maxpool)
        assert torch.equal(c2, body[2](body[1](body[0](image))))
        assert torch.equal(c4, body[4](body[3](c2)))
        assert torch.equal(c8, body[5](c4))
        # the head's arithmetic, written out: each skip adds to the x2 upsampled coarser scores
        score = model.score32(c32)
        score = model.upsample32to16(score) + model.score16(c16)
        score = model.upsample16to8(score) + model.score8(c8)
        score = model.upsample8to4(score) + model.score4(c4)
        score = model.upsample4to2(score) + model.score2(c2)
        torch.testing.assert_close(model(image), model.upsample_final(score), rtol=0, atol=0)
    assert c2.shape == (1, 64, 32, 48) and c4.shape == (1, 64, 16, 24)


def test_mobilenet_v2_stride_2_tap_is_its_last_stride_2_block():
    model = fcn_mobilenet_v2(variant="2s", num_classes=2, weights_backbone=None).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        c2, c4 = model.backbone(image)[:2]
        features = model.backbone.stage8
        assert torch.equal(c2, features[1](features[0](image)))
    assert c2.shape == (1, 16, 32, 48) and c4.shape == (1, 24, 16, 24)
    assert model.score2.in_channels == 16


def test_fcn4s_and_2s_add_three_tensors_each_and_rename_nothing_checkpoints_store():
    keys = {v: list(fcn_resnet18(variant=v, num_classes=3, weights_backbone=None).state_dict())
            for v in ("8s", "4s", "2s")}
    assert [k for k in keys["4s"] if k not in keys["8s"]] == ["score4.weight", "score4.bias", "upsample8to4.weight"]
    assert [k for k in keys["4s"] if k in keys["8s"]] == keys["8s"]
    assert [k for k in keys["2s"] if k not in keys["4s"]] == ["score2.weight", "score2.bias", "upsample4to2.weight"]
    assert [k for k in keys["2s"] if k in keys["4s"]] == keys["4s"]
    # the 8s head's names, in order (optimizer states in checkpoints follow parameter order)
    assert [k for k in keys["8s"] if not k.startswith("backbone.")] == [
        "score32.weight", "score32.bias", "score16.weight", "score16.bias", "upsample32to16.weight",
        "score8.weight", "score8.bias", "upsample16to8.weight", "upsample_final.weight"]


def test_fcn4s_needs_a_body_with_a_stride_4_tap():
    from fcnseg.models.fcn import FCN
    from tests.conftest import TinyBackbone

    three_taps = TinyBackbone()
    three_taps.channels = (8, 16, 32)
    FCN(three_taps, 3, variant="8s")  # the other variants read (c8, c16, c32) from the end
    with pytest.raises(ValueError, match="stride-4"):
        FCN(three_taps, 3, variant="4s")
    four_taps = TinyBackbone()
    four_taps.channels = (4, 8, 16, 32)
    FCN(four_taps, 3, variant="4s")
    with pytest.raises(ValueError, match="FCN-2s needs a body with a stride-2 tap: .* has only strides 4, 8, 16, 32"):
        FCN(four_taps, 3, variant="2s")


def test_chapter_fcn32s_structure():
    model = fcn_resnet18(num_classes=21, weights_backbone=None)
    assert model.score32.in_channels == 512 and model.score32.out_channels == 21
    assert model.score32.kernel_size == (1, 1)
    up = model.upsample_final
    assert isinstance(up, TransposedConvUpsampler)
    assert (up.kernel_size, up.stride, up.padding) == (64, 32, 16)
    assert up.weight.shape == (21, 21, 64, 64)
    # the body ends at layer4: 512 channels at stride 32, no avgpool/fc
    c2, c4, c8, c16, c32 = model.backbone(torch.randn(1, 3, 320, 480))
    assert c32.shape == (1, 512, 10, 15) and c16.shape == (1, 256, 20, 30) and c8.shape == (1, 128, 40, 60)
    assert c4.shape == (1, 64, 80, 120) and c2.shape == (1, 64, 160, 240)
    assert not any("fc" in k or "avgpool" in k for k in model.state_dict())


@pytest.mark.parametrize("variant", ["16s", "8s"])
def test_fresh_skip_net_starts_from_the_32s_prediction(variant):
    torch.manual_seed(0)
    net32 = fcn_resnet18(variant="32s", num_classes=5, weights_backbone=None).eval()
    net = fcn_resnet18(variant=variant, num_classes=5, weights_backbone=None).eval()
    net.backbone.load_state_dict(net32.backbone.state_dict())
    net.score32.load_state_dict(net32.score32.state_dict())
    image = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        coarse, fine = net32(image), net(image)
    # Zero-initialised skip scores contribute nothing: the fresh net is exactly the chained
    # bilinear upsampling of the 32s scores.
    with torch.no_grad():
        score = net32.score32(net32.backbone(image)[-1])
        chained = net.upsample32to16(score)
        if variant == "8s":
            chained = net.upsample16to8(chained)
        chained = net.upsample_final(chained)
    torch.testing.assert_close(fine, chained, rtol=1e-4, atol=1e-3)
    # Chained bilinear upsamplers (2x then 16x, or 2x, 2x, 8x) sample the coarse map on shifted
    # grids, so they smooth more than one 32x step: on the white-noise-like scores of a random
    # body that is about 25% relative RMS (less on the smooth scores of a trained one), with a
    # correlation above 0.95. Borders differ more (zero padding at each stage): compare inside.
    inner = (..., slice(32, -32), slice(32, -32))
    rel_rms = (fine[inner] - coarse[inner]).pow(2).mean().sqrt() / coarse[inner].pow(2).mean().sqrt()
    assert rel_rms < 0.35, rel_rms
    corr = torch.corrcoef(torch.stack([fine[inner].flatten(), coarse[inner].flatten()]))[0, 1]
    assert corr > 0.95, corr
    # and the skip layers really are zero at the start
    assert torch.count_nonzero(net.score16.weight) == 0


def test_fresh_4s_predicts_what_the_8s_it_extends_predicts():
    torch.manual_seed(0)
    net8 = fcn_resnet18(variant="8s", num_classes=5, weights_backbone=None).eval()
    net4 = fcn_resnet18(variant="4s", num_classes=5, weights_backbone=None).eval()
    with torch.no_grad():  # a trained-looking 8s: its skip scores count
        for name, param in net8.named_parameters():
            if name.startswith("score"):
                param.normal_(std=0.1)
    shared = {k: v for k, v in net8.state_dict().items() if not k.startswith("upsample_final")}
    missing = net4.load_state_dict(shared, strict=False).missing_keys
    assert sorted(missing) == ["score4.bias", "score4.weight", "upsample8to4.weight", "upsample_final.weight"]
    assert torch.count_nonzero(net4.score4.weight) == 0 and torch.count_nonzero(net4.score4.bias) == 0
    image = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        coarse, fine = net8(image), net4(image)
        # Exact: the zero stride-4 skip adds nothing, so the 4s is the x2 then x4 bilinear upsampling
        # of the very scores the 8s upsamples x8.
        score8 = net8.scores(*net8.backbone(image))
        torch.testing.assert_close(fine, net4.upsample_final(net4.upsample8to4(score8)), rtol=0, atol=1e-6)
        # x2 then x4 and one x8 are the same interpolation (align_corners=False grids compose) except
        # near the borders, where each stage's zero padding enters: exact inside on scores linear in
        # position, which both reproduce ...
        y, x = torch.arange(32.0).view(32, 1), torch.arange(40.0).view(1, 40)
        ramp = torch.stack([2 * y - 3 * x + 1, 0.5 * y + x - 7, 0 * y + 0 * x + 4, y * 0 - x, y + 0 * x])[None]
        one, two = net8.upsample_final(ramp), net4.upsample_final(net4.upsample8to4(ramp))
    inside = (..., slice(8, -8), slice(8, -8))
    torch.testing.assert_close(one[inside], two[inside], rtol=0, atol=1e-4)
    ys = torch.arange(256.0).view(256, 1)
    torch.testing.assert_close(one[0, 0][inside], (2 * ((ys + 0.5) / 8 - 0.5) - 3 * ((torch.arange(320.0) + 0.5) / 8 - 0.5)
                                                   + 1)[inside], rtol=0, atol=1e-4)
    assert (one - two).abs().max() > 1  # ... but not at the borders
    # ... and close, not equal, on a random body's scores (about 1% relative RMS inside).
    rel_rms = (fine[inside] - coarse[inside]).pow(2).mean().sqrt() / coarse[inside].pow(2).mean().sqrt()
    assert 0 < rel_rms < 0.03, rel_rms
    assert torch.corrcoef(torch.stack([fine[inside].flatten(), coarse[inside].flatten()]))[0, 1] > 0.999


def test_skip_layers_change_the_output_once_trained():
    net = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(image)
        net.score8.weight.normal_()
        after = net(image)
    assert not torch.allclose(before, after)


def test_backward_and_frozen_backbone_keeps_body_unchanged():
    model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None, freeze_backbone=True)
    model.train()
    assert not model.backbone.training  # frozen BatchNorm statistics
    body_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.score32.weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 3, (2, 64, 64)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, body_before[key], msg=key)
    assert not torch.equal(model.score32.weight, head_before)
    assert all(p.grad is None for p in model.backbone.parameters())


def test_full_fine_tuning_moves_the_body():
    model = fcn_resnet18(variant="32s", num_classes=3, weights_backbone=None).train()
    before = model.backbone.stage8[0].weight.clone()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.backbone.stage8[0].weight, before)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="fcn_resnet18"):
        build_model("fcn_vgg16")
    with pytest.raises(ValueError, match="variant"):
        fcn_resnet18(variant="1s", weights_backbone=None)
    with pytest.raises(ValueError, match="upsampler"):
        fcn_resnet18(upsampler="nearest", weights_backbone=None)
    assert list_models() == ["fcn_resnet18", "fcn_resnet34", "fcn_resnet50", "fcn_mobilenet_v2"]


def test_mobilenet_taps_have_the_documented_channels():
    model = fcn_mobilenet_v2(variant="8s", num_classes=2, weights_backbone=None)
    c2, c4, c8, c16, c32 = model.backbone(torch.randn(1, 3, 64, 96))
    assert tuple(c.shape[1] for c in (c2, c4, c8, c16, c32)) == model.backbone.channels == (16, 24, 32, 96, 1280)
    assert c8.shape[-2:] == (8, 12) and c16.shape[-2:] == (4, 6) and c32.shape[-2:] == (2, 3)
    assert c4.shape[-2:] == (16, 24) and c2.shape[-2:] == (32, 48)


def test_chapter_parameter_count_with_the_transposed_convolution_bias():
    # The chapter's ResNet-18 FCN-32s for VOC (its nn.ConvTranspose2d has a bias): 12,993,642.
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(fcn_resnet18(variant="32s", num_classes=21, weights_backbone=None, upsampler_bias=True)) == 12_993_642
    assert count(fcn_resnet18(variant="32s", num_classes=21, weights_backbone=None)) == 12_993_621


@pytest.mark.parametrize("name,variant", [("fcn_resnet18", "16s"), ("fcn_resnet18", "8s"), ("fcn_resnet34", "32s"),
                                          ("fcn_resnet50", "16s"), ("fcn_mobilenet_v2", "8s"), ("fcn_resnet18", "4s")])
def test_upsampler_bias_is_on_the_final_upsampler_only_and_adds_to_every_pixel(name, variant):
    torch.manual_seed(0)
    model = build_model(name, variant=variant, num_classes=4, weights_backbone=None, upsampler_bias=True).eval()
    assert model.model_kwargs["upsampler_bias"] is True
    biased = [n for n, p in model.named_parameters() if n.startswith("upsample")]
    assert "upsample_final.bias" in biased and all(n.endswith("weight") for n in biased if n != "upsample_final.bias")
    image = torch.randn(1, 3, 67, 93)
    bias = torch.tensor([1.5, -2.0, 0.25, 3.0])
    with torch.no_grad():
        model.upsample_final.bias.zero_()
        without = model(image)
        model.upsample_final.bias.copy_(bias)
        with_bias = model(image)
    assert with_bias.shape == (1, 4, 67, 93)
    torch.testing.assert_close(with_bias - without, bias.view(1, 4, 1, 1).expand_as(without), rtol=0, atol=1e-5)


def test_upsampler_bias_survives_a_checkpoint_and_old_checkpoints_load_without_it():
    from fcnseg.models.checkpoint import make_checkpoint, model_from_checkpoint

    model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None, upsampler_bias=True)
    with torch.no_grad():
        model.upsample_final.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    checkpoint = make_checkpoint(model, classes=["a", "b", "c"], colors=[(0, 0, 0)] * 3)
    assert checkpoint["model_kwargs"]["upsampler_bias"] is True
    rebuilt = model_from_checkpoint(checkpoint)
    torch.testing.assert_close(rebuilt.upsample_final.bias, model.upsample_final.bias)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(image), model.eval()(image))

    old_model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None)
    old = make_checkpoint(old_model, classes=["a", "b", "c"], colors=[(0, 0, 0)] * 3)
    assert old["model_kwargs"].pop("upsampler_bias") is False  # as checkpoints made before the option
    assert model_from_checkpoint(old).upsample_final.bias is None
