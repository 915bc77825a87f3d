"""`Segmenter` on every kind of input: sizes, input types, lists, checkpoint metadata, refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg import runtime
from fcnseg.errors import OptionError
from fcnseg.inference.segmenter import Segmenter
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    # Smooth gradients plus noise: a random-weight FCN then predicts more than one class.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([yy * 255 / max(height - 1, 1), xx * 255 / max(width - 1, 1), (yy + xx) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


# --- Segmenter -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(model):
    return Segmenter(model, CLASSES, COLORS, device="cpu")


@pytest.mark.parametrize("size", [(375, 500), (1, 1), (33, 1000), (67, 93), (64, 96)])
@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_output_has_the_input_size(model, size, mode):
    segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", mode=mode, window=(160, 240))
    image = np.zeros((*size, 3), dtype=np.uint8)
    label = segmenter.predict(image)
    assert label.shape == size and label.dtype == np.int64
    assert segmenter.predict_proba(image).shape == (3, *size)


def test_every_input_kind_gives_the_same_result(segmenter, tmp_path):
    photo = _photo(67, 93)
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    reference = segmenter.predict_proba(photo)
    tensor = torch.from_numpy(photo).permute(2, 0, 1)
    inputs = {
        "path": path, "str": str(path), "pil": Image.fromarray(photo), "uint8 tensor": tensor,
        "float tensor": tensor.float() / 255, "float array": photo.astype(np.float32) / 255,
        "rgba array": np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)]),
    }
    for name, value in inputs.items():
        np.testing.assert_allclose(segmenter.predict_proba(value), reference, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(segmenter.predict(value), reference.argmax(0), err_msg=name)
    assert reference.std(axis=(1, 2)).min() > 1e-3  # the comparison is not between constant maps


def test_grayscale_input_equals_its_rgb_replication(segmenter):
    gray = _photo(40, 50)[..., 0]
    rgb = np.repeat(gray[..., None], 3, axis=2)
    expected = segmenter.predict_proba(rgb)
    np.testing.assert_allclose(segmenter.predict_proba(Image.fromarray(gray, mode="L")), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(segmenter.predict_proba(gray), expected, rtol=1e-5, atol=1e-6)


def test_lists_batch_equal_sizes_and_keep_order(segmenter):
    images = [_photo(64, 96, 0), _photo(67, 93, 1), _photo(64, 96, 2), _photo(20, 30, 3)]
    labels = segmenter.predict(images)
    probas = segmenter.predict_proba(images)
    assert isinstance(labels, list) and len(labels) == 4
    for image, label, proba in zip(images, labels, probas):
        np.testing.assert_allclose(proba, segmenter.predict_proba(image), rtol=1e-4, atol=1e-5)
        assert label.shape == image.shape[:2]
        np.testing.assert_array_equal(label, proba.argmax(0))
    assert probas[0].dtype == np.float32
    np.testing.assert_allclose(probas[1].sum(0), 1.0, rtol=1e-5)


def test_from_checkpoint_uses_its_metadata(resnet_model, tmp_path):
    checkpoint = make_checkpoint(resnet_model, classes=CLASSES, colors=COLORS, mean=(0.5, 0.5, 0.5),
                                 std=(0.25, 0.5, 1.0))
    path = save_checkpoint(checkpoint, tmp_path / "ck.pt")
    segmenter = Segmenter.from_checkpoint(path, device="cpu", mode="sliding", window=(32, 48), flip=True)
    assert segmenter.classes == CLASSES and segmenter.colors == COLORS
    settings = (segmenter.mode, segmenter.window, segmenter.flip, segmenter.device.type)
    assert settings == ("sliding", (32, 48), True, "cpu")
    gray = np.full((8, 8, 3), 255, dtype=np.uint8)
    x = segmenter.preprocess(gray)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    assert segmenter.predict(_photo(40, 60)).shape == (40, 60)


def test_segmenter_validates_arguments(model):
    with pytest.raises(ValueError, match="mode"):
        Segmenter(model, CLASSES, COLORS, mode="tiles")
    with pytest.raises(ValueError, match="colours"):
        Segmenter(model, CLASSES, COLORS[:2])
    with pytest.raises(ValueError, match="shape"):
        Segmenter(model, CLASSES, COLORS, device="cpu").predict(torch.zeros(2, 3, 8, 8))


def test_a_stride_larger_than_the_window_is_refused_when_the_segmenter_is_made(model, monkeypatch):
    """Refused at construction, before the model is copied or any image read."""
    monkeypatch.setattr("fcnseg.inference.segmenter.inference_form", lambda *a, **k: pytest.fail("model prepared"))
    with pytest.raises(OptionError, match="sliding stride 40x30 is larger than the window 32x48"):
        Segmenter(model, CLASSES, COLORS, device="cpu", mode="sliding", window=(32, 48), stride=(40, 30))
    with pytest.raises(OptionError, match="sliding window must be two positive sides"):
        Segmenter(model, CLASSES, COLORS, device="cpu", mode="sliding", window=(0, 48))
    with pytest.raises(OptionError, match="sliding stride must be two positive steps"):
        Segmenter(model, CLASSES, COLORS, device="cpu", mode="sliding", window=(32, 48), stride=(-1, 30))
    with pytest.raises(OptionError, match="batch_size must be positive"):
        Segmenter(model, CLASSES, COLORS, device="cpu", batch_size=0)


@pytest.mark.parametrize("native", [True, False])
def test_default_precision_is_amp_auto(model, monkeypatch, native):
    """The fast path is the default path: bf16 where the CPU computes it natively, float32 elsewhere."""
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: native)
    assert Segmenter(model, CLASSES, COLORS, device="cpu").dtype == (torch.bfloat16 if native else None)
    assert Segmenter(model, CLASSES, COLORS, device="cpu", amp="none").dtype is None
    assert Segmenter(model, CLASSES, COLORS, device="cpu", amp="bf16").dtype == torch.bfloat16
    # An explicit dtype overrides amp, None (float32) included.
    assert Segmenter(model, CLASSES, COLORS, device="cpu", amp="bf16", dtype=None).dtype is None
    assert Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(OptionError, match="unknown amp choice 'fast'"):
        Segmenter(model, CLASSES, COLORS, device="cpu", amp="fast")


def test_from_checkpoint_takes_amp(resnet_model, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: True)
    path = save_checkpoint(make_checkpoint(resnet_model, classes=CLASSES, colors=COLORS), tmp_path / "ck.pt")
    assert Segmenter.from_checkpoint(path, device="cpu").dtype == torch.bfloat16
    fp32 = Segmenter.from_checkpoint(path, device="cpu", amp="none")
    assert fp32.dtype is None and fp32.amp == "none"
    # amp="none" gives the float32 logits of the model it predicts with.
    photo = _photo(64, 96)
    x = fp32.preprocess(photo)[None]
    with torch.inference_mode():
        reference = fp32.model(x)[0].softmax(0).numpy()
    np.testing.assert_allclose(fp32.predict_proba(photo), reference, rtol=1e-5, atol=1e-6)


def test_another_engine_computes_while_torch_is_single_threaded(model):
    """Torch's spinning OpenMP threads would take the cores from another engine's threads."""
    segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none")
    torch_engine, seen = segmenter.engine, []

    def foreign_engine(image: torch.Tensor) -> torch.Tensor:  # not an nn.Module: as onnxruntime's
        seen.append(torch.get_num_threads())
        with torch.inference_mode():
            return torch_engine(image)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = segmenter.predict(_photo(40, 56))
        segmenter.engine = foreign_engine
        np.testing.assert_array_equal(segmenter.predict(_photo(40, 56)), expected)
        segmenter.predict_proba(_photo(40, 56))
        segmenter.logits(segmenter.preprocess(_photo(40, 56))[None])
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2  # restored after each call
        segmenter.engine = torch_engine
        assert segmenter.predict(_photo(40, 56)).shape == (40, 56) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_scales_average_the_logits_of_the_resized_and_flipped_images(model):
    segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", optimize=False, scales=(1, 1.5), flip=True)
    x = segmenter.preprocess(_photo(30, 44)).unsqueeze(0)
    expected = torch.zeros(1, len(CLASSES), 30, 44)
    with torch.no_grad():
        for size in ((30, 44), (45, 66)):
            view = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
            both = (model(view) + model(view.flip(-1)).flip(-1)) / 2
            expected += torch.nn.functional.interpolate(both, size=(30, 44), mode="bilinear", align_corners=False) / 2
    torch.testing.assert_close(segmenter.logits(x), expected, rtol=1e-4, atol=1e-4)
    plain = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", optimize=False, flip=True)
    assert not torch.allclose(plain.logits(x), expected, atol=1e-3)  # the scales changed something


@pytest.mark.parametrize("scales", [(), (1.0, 0.0), (-1.0,)])
def test_scales_must_be_positive(model, scales):
    with pytest.raises(OptionError, match="scales must be positive numbers"):
        Segmenter(model, CLASSES, COLORS, device="cpu", scales=scales)
