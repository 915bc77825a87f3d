"""Frozen-backbone training on cached features: exactness against the full model, determinism, learning."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from fcnseg import fcn_resnet18
from fcnseg.data.samplers import SeededTransformDataset
from fcnseg.data.transforms import train_transforms
from fcnseg.errors import FcnsegError
from fcnseg.models.checkpoint import load_checkpoint
from fcnseg.ops.loss import segmentation_loss
from fcnseg.training.cached_head import CachedFeatureHead, pack_features, unpack_features
from fcnseg.training.config import resolve_config
from fcnseg.training.feature_cache import FeatureCache
from fcnseg.training.trainer import train


class RandomPairs(Dataset):
    """Random uint8 images and 3-class masks of an odd size, a function of the index only."""

    def __init__(self, n: int, size: tuple[int, int] = (50, 70)) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, *self.size), generator=g, dtype=torch.uint8)
        mask = torch.randint(0, 3, self.size, generator=g)
        mask[:3] = 255  # some void, as in VOC
        return image, mask


def augmented(seed: int = 0, n: int = 5) -> SeededTransformDataset:
    # Random scale, pad, crop and flip: every kind of augmentation a view has to reproduce.
    return SeededTransformDataset(RandomPairs(n), train_transforms(crop_size=(40, 56), scale_range=(0.7, 1.4)), seed)


def frozen_model(variant: str) -> torch.nn.Module:
    model = fcn_resnet18(variant=variant, num_classes=3, weights_backbone=None, freeze_backbone=True)
    with torch.no_grad():  # a trained-looking head: 16s/8s score layers start at zero otherwise
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model.train()


@pytest.mark.parametrize("variant", ["32s", "16s", "8s", "4s", "2s"])
def test_pack_unpack_round_trip(variant):
    model = frozen_model(variant)
    with torch.no_grad():
        features = model.backbone(torch.randn(2, 3, 64, 96))
    restored = unpack_features(pack_features(features, variant), model.backbone.channels, variant)
    for original, back in zip(features, restored):
        assert back is None or torch.equal(original, back)
    read = {"32s": 1, "16s": 2, "8s": 3, "4s": 4, "2s": 5}[variant]  # taps read, from the end (c32 first)
    assert len(restored) == 5 and all((back is None) == (k < 5 - read) for k, back in enumerate(restored))


@pytest.mark.parametrize("variant", ["32s", "8s", "4s", "2s"])
def test_cached_head_equals_the_full_frozen_model_on_the_same_view(variant):
    model = frozen_model(variant)
    views = augmented()
    cache = FeatureCache.build(model, views, num_views=2, dtype="float32")
    head = CachedFeatureHead(model, cache.size)
    params = [p for p in model.parameters() if p.requires_grad]
    for view, index in [(0, 0), (1, 3)]:
        views.set_epoch(view)
        image, target = views[index]
        packed, cached_target = cache.sample(view, index)
        assert torch.equal(cached_target, target)
        full, cached = model(image[None]), head(packed[None])
        assert full.shape == cached.shape == (1, 3, 40, 56)
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        loss_full = segmentation_loss(full, target[None])
        loss_cached = segmentation_loss(cached, target[None])
        torch.testing.assert_close(loss_cached, loss_full, rtol=1e-6, atol=1e-6)
        for g_cached, g_full in zip(torch.autograd.grad(loss_cached, params), torch.autograd.grad(loss_full, params)):
            torch.testing.assert_close(g_cached, g_full, rtol=1e-4, atol=1e-6)


def test_float16_storage_is_close_and_memmap_matches_memory(tmp_path):
    model = frozen_model("32s")
    views = augmented()
    exact = FeatureCache.build(model, views, num_views=1, dtype="float32")
    half = FeatureCache.build(model, views, num_views=1, directory=tmp_path / "cache")
    head = CachedFeatureHead(model, exact.size)
    packed, _ = exact.sample(0, 2)
    packed16, _ = half.sample(0, 2)
    assert packed16.dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(head(packed16[None]), head(packed[None]), rtol=2e-3, atol=2e-3)
    # A second build with the same inputs reopens the files instead of recomputing.
    before = (tmp_path / "cache" / "features.npy").stat().st_mtime_ns
    again = FeatureCache.build(model, views, num_views=1, directory=tmp_path / "cache")
    assert (tmp_path / "cache" / "features.npy").stat().st_mtime_ns == before
    assert torch.equal(again.sample(0, 2)[0], packed16)


def test_caching_with_a_seed_is_deterministic():
    model = frozen_model("16s")
    a = FeatureCache.build(model, augmented(seed=1), num_views=2)
    b = FeatureCache.build(model, augmented(seed=1), num_views=2)
    c = FeatureCache.build(model, augmented(seed=2), num_views=2)
    assert torch.equal(a.features, b.features) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)
    # The views differ from each other: each is one epoch's augmentation.
    assert not torch.equal(a.targets[0], a.targets[1])


def test_refuses_an_unfrozen_body_and_a_cache_without_freezing():
    model = fcn_resnet18(variant="32s", num_classes=3, weights_backbone=None)
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache.build(model, augmented(), num_views=1)
    with pytest.raises(FcnsegError, match="freeze-backbone"):
        resolve_config({"root": "x", "cache_features": 2})


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from fcnseg.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("scenes") / "data", num_classes=2, n=5, size=(48, 64), seed=0,
                          progress=False)


def cached_config(root, out, **overrides):
    values = {
        "dataset": "folder", "root": str(root), "val_split": "train", "model": "fcn_resnet18", "variant": "8s",
        "weights_backbone": "none", "freeze_backbone": True, "cache_features": 2, "crop": (48, 64),
        "scale_range": None, "batch_size": 2, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0,
        "schedule": "constant", "workers": 0, "amp": "none", "channels_last": False, "out": str(out),
        "save_every": 99,  # last.pt is still written at the end; one checkpoint per run keeps this fast
    }
    values.update(overrides)
    return resolve_config(values)


def test_a_tiny_cached_run_learns_and_validates_the_full_model(scenes, tmp_path):
    result = train(cached_config(scenes, tmp_path / "run", epochs=8, eval_every=8), progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.final_metrics is not None and result.final_metrics["pixel_acc"] > 0.6
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["config"]["cache_features"] == 2 and checkpoint["global_step"] == 8 * 2


def test_a_resumed_cached_run_matches_an_uninterrupted_one(scenes, tmp_path):
    # Epoch 2 uses view 0 again (2 views): the resumed run must pick the views up where they were.
    train(cached_config(scenes, tmp_path / "straight", epochs=3, eval_every=99), progress=False)
    train(cached_config(scenes, tmp_path / "resumed", epochs=2, eval_every=99), progress=False)
    train(cached_config(scenes, tmp_path / "resumed", epochs=3, eval_every=99, resume=True), progress=False)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_fcn4s_run_trains_the_stride_4_skip(scenes, tmp_path):
    train(cached_config(scenes, tmp_path / "run", variant="4s", epochs=1, eval_every=99), progress=False)
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["model_kwargs"]["variant"] == "4s"
    assert torch.count_nonzero(checkpoint["state_dict"]["score4.weight"]) > 0  # it starts at zero


def test_the_fine_taps_are_in_the_fingerprint_of_the_caches_that_read_them_only():
    from fcnseg.training.feature_cache import cache_fingerprint

    views = augmented()
    fingerprints = {}
    for c2, c4 in ((64, 64), (64, 65), (65, 64)):  # a body whose stride-2 or stride-4 tap differs, nothing else
        for variant in ("8s", "4s", "2s"):
            torch.manual_seed(0)  # the same body weights every time
            model = frozen_model(variant)
            model.backbone.channels = (c2, c4, *model.backbone.channels[2:])
            fingerprints[c2, c4, variant] = cache_fingerprint(model, views, 2, "float16")
    # caches made before FCN-4s (bodies of three taps) stay valid for 32s/16s/8s, and 4s caches for 4s
    assert fingerprints[64, 64, "8s"] == fingerprints[64, 65, "8s"] == fingerprints[65, 64, "8s"]
    assert fingerprints[64, 64, "4s"] == fingerprints[65, 64, "4s"] != fingerprints[64, 65, "4s"]
    assert len({fingerprints[key + ("2s",)] for key in ((64, 64), (64, 65), (65, 64))}) == 3
    assert len({fingerprints[64, 64, v] for v in ("8s", "4s", "2s")}) == 3
