"""ONNX export: parity with PyTorch in onnxruntime on several sizes, metadata, the docs example.

The dynamo exporter (the default) needs 10-30 s for a ResNet-18 FCN on a shared 2-core machine,
so the default run exports with it once, an FCN-8s on a tiny backbone (the same FCN class: pad,
skips, upsamplers, crop), and leaves the ResNet-18 variants to the ``slow`` marker; the legacy
exporter (about a second) covers ResNet-18 FCN-32s, 16s and 8s in the default run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fcnseg import FCN, fcn_resnet18
from fcnseg.errors import FcnsegError
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fcnseg[export]')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fcnseg[export]')")

from fcnseg.export import export_onnx, read_onnx_metadata  # noqa: E402

CLASSES = ["background", "road", "sky"]
COLORS = [(0, 0, 0), (128, 64, 128), (70, 130, 180)]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SIZES = ((64, 96), (67, 93))
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(tmp_path: Path, variant: str) -> Path:
    torch.manual_seed(0)
    model = fcn_resnet18(variant=variant, num_classes=3, weights_backbone=None)
    with torch.no_grad():  # the skip scores start at zero; make them count in the parity check
        for name, param in model.named_parameters():
            if name.startswith(("score16", "score8", "score4")):
                param.normal_(std=0.1)
    return save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS, mean=MEAN, std=STD),
                           tmp_path / f"fcn{variant}.pt")


class TinyBackbone(nn.Module):
    """Strided conv + BatchNorm + ReLU blocks and a max-pool (ResNet's operators), taps at strides 4, 8, 16, 32."""

    channels = (8, 8, 16, 32)

    def __init__(self) -> None:
        super().__init__()

        def conv(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.stage8 = nn.Sequential(conv(3, 8), nn.MaxPool2d(3, 2, 1), conv(8, 8))
        self.stage16 = conv(8, 16)
        self.stage32 = conv(16, 32)

    def forward(self, x):
        c4 = self.stage8[:2](x)
        c8 = self.stage8[2:](c4)
        c16 = self.stage16(c8)
        return c4, c8, c16, self.stage32(c16)


def tiny_fcn(variant: str = "8s") -> FCN:
    torch.manual_seed(0)
    model = FCN(TinyBackbone(), 3, variant=variant)
    for name, param in model.named_parameters():
        if name.startswith("score"):  # the skip scores start at zero; make them count
            nn.init.normal_(param, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def dynamo_export(tmp_path_factory):
    """A tiny FCN-8s exported once with the default (dynamo) exporter, shared by the tests below."""
    folder = tmp_path_factory.mktemp("dynamo")
    model = tiny_fcn("8s")
    report = export_onnx(model, folder / "model.onnx", classes=CLASSES, colors=COLORS, mean=MEAN, std=STD, sizes=SIZES)
    return model, folder / "model.onnx", report


def test_dynamo_export_matches_pytorch_on_two_sizes(dynamo_export):
    _, path, report = dynamo_export
    assert path.is_file() and report["verified"] and report["exporter"] == "dynamo"
    assert [tuple(p["size"]) for p in report["parity"]] == list(SIZES)
    assert report["parity"][0]["batch"] == 2  # the dynamic batch axis is exercised too
    assert report["max_abs_diff"] < 1e-4
    assert report["opset"] >= 18


def test_exported_model_has_named_dynamic_axes_and_any_size_works(dynamo_export):
    model, path, _ = dynamo_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image_input,), (logits_output,) = session.get_inputs(), session.get_outputs()
    assert (image_input.name, image_input.shape) == ("image", ["batch", 3, "height", "width"])
    assert (logits_output.name, logits_output.shape) == ("logits", ["batch", 3, "height", "width"])
    for size in [(1, 1), (33, 100)]:  # sizes never seen by the exporter or the check
        image = torch.randn(1, 3, *size)
        (logits,) = session.run(None, {"image": image.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(image).numpy(), atol=1e-4)


def test_metadata_round_trips(dynamo_export):
    _, path, _ = dynamo_export
    metadata = read_onnx_metadata(path)
    assert metadata["classes"] == CLASSES
    assert metadata["colors"] == [list(c) for c in COLORS]
    assert metadata["mean"] == list(MEAN) and metadata["std"] == list(STD)
    raw = onnx.load(str(path)).metadata_props
    for entry in raw:  # every value is a JSON string, as docs/INFERENCE.md decodes them
        json.loads(entry.value)


def _docs_example() -> str:
    text = (REPO / "docs" / "INFERENCE.md").read_text()
    section = text[text.index("## The ONNX model with onnxruntime alone"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_example_runs_without_torch(dynamo_export, tmp_path):
    model, path, _ = dynamo_export
    (tmp_path / "model.onnx").write_bytes(path.read_bytes())
    photo = np.random.default_rng(0).integers(0, 256, (67, 93, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    # `sys.modules["torch"] = None` makes any `import torch` fail, so the example must do without it.
    script = "import sys\nsys.modules['torch'] = None\n" + _docs_example()
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert "of the pixels" in result.stdout

    from fcnseg.inference.segmenter import Segmenter

    expected = Segmenter(model, CLASSES, COLORS, MEAN, STD, device="cpu").predict(tmp_path / "photo.jpg")
    colors = np.array(COLORS, dtype=np.uint8)
    with Image.open(tmp_path / "photo_mask.png") as mask:
        written = np.asarray(mask.convert("RGB"))
    assert np.mean(np.all(written == colors[expected], axis=-1)) > 0.999
    assert (tmp_path / "photo_overlay.png").is_file()


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("variant", ["32s", "16s", "8s", "4s", "2s"])
def test_export_of_every_variant_matches_pytorch(tmp_path, variant, exporter):
    report = export_onnx(_checkpoint(tmp_path, variant), tmp_path / "m.onnx", sizes=SIZES, exporter=exporter)
    assert report["verified"] and report["max_abs_diff"] < 1e-4
    assert [tuple(p["size"]) for p in report["parity"]] == list(SIZES)
    metadata = read_onnx_metadata(tmp_path / "m.onnx")
    assert metadata["classes"] == CLASSES and metadata["mean"] == list(MEAN)
    assert metadata["model_name"] == "fcn_resnet18" and metadata["model_kwargs"]["variant"] == variant


def test_export_from_a_module_with_default_metadata(tmp_path):
    model = tiny_fcn("16s").train()
    report = export_onnx(model, tmp_path / "m.onnx", sizes=((64, 64),), exporter="legacy")
    assert report["verified"] and model.training  # the caller's model is left as it was
    metadata = read_onnx_metadata(tmp_path / "m.onnx")
    assert metadata["classes"] == ["0", "1", "2"]
    assert metadata["colors"] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # the VOC palette
    assert metadata["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_static_export_fixes_the_input_shape(tmp_path):
    report = export_onnx(tiny_fcn("32s"), tmp_path / "m.onnx", sizes=SIZES, exporter="legacy", dynamic=False)
    assert [tuple(p["size"]) for p in report["parity"]] == [SIZES[0]]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 96]


def test_parity_failure_raises_and_writes_nothing(tmp_path, monkeypatch):
    import fcnseg.export.onnx

    monkeypatch.setattr(fcnseg.export.onnx, "verify_onnx",
                        lambda *a, **k: [{"size": (64, 96), "batch": 1, "max_abs_diff": 0.5}])
    with pytest.raises(FcnsegError, match="differs"):
        export_onnx(tiny_fcn("32s"), tmp_path / "m.onnx", sizes=SIZES, exporter="legacy")
    assert not (tmp_path / "m.onnx").exists()
    assert not list(tmp_path.glob(".m.onnx*"))  # no temporary file left behind


def test_dynamo_needs_opset_18(tmp_path):
    with pytest.raises(FcnsegError, match="opset"):
        export_onnx(tiny_fcn("32s"), tmp_path / "m.onnx", opset=17)


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_export_keeps_the_final_upsampler_bias(tmp_path, exporter):
    model = tiny_fcn("8s")
    biased = FCN(TinyBackbone(), 3, variant="8s", upsampler_bias=True).eval()
    biased.load_state_dict({**model.state_dict(), "upsample_final.bias": torch.tensor([2.0, -3.0, 1.0])})
    report = export_onnx(biased, tmp_path / "m.onnx", sizes=SIZES, exporter=exporter)
    assert report["verified"] and report["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    image = torch.randn(1, 3, 33, 100)
    (logits,) = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        without = model(image)
    # the bias, added to every pixel: what separates the exported model from the same one without it
    np.testing.assert_allclose(logits - without.numpy(), np.broadcast_to(np.array([2.0, -3.0, 1.0]).reshape(1, 3, 1, 1),
                                                                          logits.shape), atol=1e-4)
