"""INT8 export: a QDQ model calibrated on a folder of images, runnable as a Segmenter, metadata kept;
calibration mistakes are usage errors and leave no file; the CLI's --int8."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg import fcn_mobilenet_v2
from fcnseg.cli import export as export_cli
from fcnseg.cli import main
from fcnseg.errors import UsageError
from fcnseg.inference.segmenter import Segmenter
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint
from tests.conftest import gradient_photo, three_class_tiny_fcn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from fcnseg.export import int8 as int8_module  # noqa: E402
from fcnseg.export.int8 import calibration_files, export_int8  # noqa: E402
from fcnseg.export.onnx import read_onnx_metadata  # noqa: E402
from fcnseg.inference import onnx_engine  # noqa: E402
from fcnseg.inference.onnx_engine import onnx_segmenter  # noqa: E402

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(variant: str = "8s"):
    return three_class_tiny_fcn(variant)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    for index in range(6):
        Image.fromarray(gradient_photo(64, 96, seed=index)).save(folder / f"frame{index}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def int8_file(calibration, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "tiny_int8.onnx"
    report = export_int8(_model(), path, calibration, calibration_images=4, exporter="legacy", classes=CLASSES,
                         colors=COLORS, sizes=[(64, 96)])
    return path, report


def test_int8_file_is_quantised_and_keeps_the_metadata(int8_file):
    path, report = int8_file
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights  # convolution weights stored as int8
    metadata = {entry.key: json.loads(entry.value) for entry in model.metadata_props}
    assert metadata["classes"] == CLASSES and metadata["colors"] == [list(c) for c in COLORS]
    assert metadata["quantization"]["format"] == "QDQ"
    assert report["calibration_images"] == 4 and report["unreadable"] == 0
    assert report["int8_bytes"] == path.stat().st_size


def test_int8_segmenter_agrees_with_float32(int8_file, calibration):
    path, report = int8_file
    reference = Segmenter(_model(), CLASSES, COLORS, device="cpu", amp="none")
    images = [gradient_photo(64, 96, seed=index) for index in range(6)] + [gradient_photo(70, 90, seed=9)]
    for backend in ("onnxruntime", "openvino"):
        if backend == "openvino":
            pytest.importorskip("openvino")
        segmenter = onnx_segmenter(path, backend=backend)
        agreement = np.mean([np.mean(a == b) for a, b in zip(segmenter.predict(images), reference.predict(images))])
        assert agreement > 0.9, backend
    # The report's agreement (INT8 against the float32 ONNX model, on the calibration images) is
    # what the float32 PyTorch model measures too, up to the ONNX export's ~1e-6.
    files = calibration_files(calibration, 4)
    int8_preds = onnx_segmenter(path).predict([str(f) for f in files[:8]])
    torch_preds = reference.predict([str(f) for f in files[:8]])
    measured = np.mean(np.concatenate([(a == b).ravel() for a, b in zip(int8_preds, torch_preds)]))
    assert abs(measured - report["agreement"]) < 0.005
    assert len(np.unique(np.stack(torch_preds))) == 3  # not a constant map


def test_int8_export_of_an_fcn4s_agrees_with_float32(calibration, tmp_path):
    model = _model("4s")
    path = tmp_path / "tiny4s_int8.onnx"
    report = export_int8(model, path, calibration, calibration_images=4, exporter="legacy", classes=CLASSES,
                         colors=COLORS, sizes=[(64, 96)])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and report["int8_bytes"] == path.stat().st_size
    images = [gradient_photo(64, 96, seed=index) for index in range(3)] + [gradient_photo(70, 90, seed=9)]
    torch_preds = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none").predict(images)
    int8_preds = onnx_segmenter(path).predict(images)
    assert np.mean([np.mean(a == b) for a, b in zip(int8_preds, torch_preds)]) > 0.9
    assert len(np.unique(np.stack(torch_preds[:3]))) > 1  # not a constant map


def _weight_codes(path) -> np.ndarray:
    """Every int8 convolution weight code stored in an ONNX file."""
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    return np.concatenate([w.ravel() for w in weights])


def test_reduce_range_writes_7_bit_weights_and_says_so(int8_file, calibration, tmp_path):
    path, report = int8_file
    other = tmp_path / "other.onnx"
    other_report = export_int8(_model(), other, calibration, calibration_images=4, exporter="legacy",
                               classes=CLASSES, colors=COLORS, sizes=[(64, 96)], reduce_range=not report["reduce_range"])
    files = {report["reduce_range"]: path, other_report["reduce_range"]: other}
    seven, eight = _weight_codes(files[True]), _weight_codes(files[False])
    # Per-channel symmetric weights: each channel's largest weight takes the range's end.
    assert np.abs(seven.astype(int)).max() == 64  # 255 * 64 * 2 fits the 16 bits of a non-VNNI pair sum
    assert np.abs(eight.astype(int)).max() == 127
    for reduce_range, file in files.items():
        note = read_onnx_metadata(file)["quantization"]
        assert note["reduce_range"] is reduce_range and ("7-bit" in note["weights"]) is reduce_range


@pytest.mark.parametrize("needs", [True, False])
def test_the_default_range_is_what_this_cpu_needs(monkeypatch, calibration, tmp_path, needs):
    monkeypatch.setattr(int8_module, "int8_needs_reduced_range", lambda: needs)
    report = export_int8(_model(), tmp_path / "m.onnx", calibration, calibration_images=2, exporter="legacy",
                         sizes=[(64, 96)], verify=False)
    assert report["reduce_range"] is needs


def test_8_bit_weights_on_a_cpu_that_overflows_them_are_a_warning(int8_file, calibration, tmp_path, monkeypatch):
    path, report = int8_file
    eight = path
    if report["reduce_range"]:
        eight = tmp_path / "eight.onnx"
        export_int8(_model(), eight, calibration, calibration_images=2, exporter="legacy", classes=CLASSES,
                    colors=COLORS, sizes=[(64, 96)], verify=False, reduce_range=False)
    monkeypatch.setattr(onnx_engine, "int8_needs_reduced_range", lambda: True)
    with pytest.warns(RuntimeWarning, match=r"eight.onnx|tiny_int8.onnx") as record:
        onnx_segmenter(eight)
    assert "8-bit INT8 weights" in str(record[0].message) and "fcnseg export --int8" in str(record[0].message)
    monkeypatch.setattr(onnx_engine, "int8_needs_reduced_range", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onnx_segmenter(eight)  # a CPU with VNNI: no warning


def test_calibration_files_are_spread_over_the_folder(tmp_path):
    for index in range(10):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"{index:02d}.png")
    assert [p.name for p in calibration_files(tmp_path, 4)] == ["00.png", "03.png", "06.png", "09.png"]
    assert len(calibration_files(tmp_path, 50)) == 10


@pytest.mark.parametrize("case", ["missing", "file", "empty", "unreadable"])
def test_calibration_mistakes_are_usage_errors_and_write_nothing(tmp_path, case):
    folder = tmp_path / "calibration"
    if case == "file":
        folder.write_text("x")
    elif case in ("empty", "unreadable"):
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
        if case == "unreadable":
            (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "model_int8.onnx"
    message = {"missing": "does not exist", "file": "is not a folder", "empty": "holds no images",
               "unreadable": "none of the 1 calibration images can be read"}[case]
    with pytest.raises(UsageError, match=message):
        export_int8(_model(), out, folder, exporter="legacy", sizes=[(64, 96)])
    assert not out.exists() and list(tmp_path.iterdir()) == ([folder] if case != "missing" else [])


def test_cli_int8(tmp_path, calibration, capsys, monkeypatch):
    torch.manual_seed(0)  # a registered model: a checkpoint records its builder
    model = fcn_mobilenet_v2(variant="8s", num_classes=3, weights_backbone=None)
    checkpoint = save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS), tmp_path / "tiny.pt")
    out = tmp_path / "tiny_int8.onnx"
    assert main(["export", str(checkpoint), "--int8", "--calibration", str(calibration), "--calibration-images", "3",
                 "--exporter", "legacy", "--sizes", "64x96"]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and "calibrated on 3 images" in printed
    assert ("7-bit weights" in printed) is read_onnx_metadata(out)["quantization"]["reduce_range"]
    monkeypatch.setattr(export_cli, "INT8_AGREEMENT_WARNING", 1.01)  # no file agrees on 101%: the warning shows
    assert main(["export", str(checkpoint), "--int8", "--calibration", str(calibration), "--calibration-images", "2",
                 "--exporter", "legacy", "--sizes", "64x96", "--no-verify", "--out", str(tmp_path / "w.onnx")]) == 0
    assert "warning: below 101%: compare both files with fcnseg eval" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--reduce-range", "--out", str(tmp_path / "d.onnx")]) == 2
    assert "--reduce-range applies to an INT8 export: add --int8" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--int8", "--out", str(tmp_path / "a.onnx")]) == 2
    assert "--int8 needs --calibration DIR" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--calibration", str(calibration), "--out", str(tmp_path / "b.onnx")]) == 2
    assert "--calibration applies to an INT8 export: add --int8" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--int8", "--calibration", str(tmp_path / "none"),
                 "--out", str(tmp_path / "c.onnx")]) == 2
    assert "calibration folder" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("a.onnx", "b.onnx", "c.onnx", "d.onnx"))


def test_int8_output_is_dequantised_after_the_last_upsampler(int8_file):
    """The final DepthToSpace and crops move uint8 (fcnseg.export.qdq_tail): the graph ends in the
    one DequantizeLinear that makes the logits, fed by a chain of data movement from quantised data."""
    model = onnx.load(str(int8_file[0]))
    producer = {name: node for node in model.graph.node for name in node.output}
    assert producer["logits"].op_type == "DequantizeLinear"
    node, moves = producer[producer["logits"].input[0]], []
    while node.op_type in {"Slice", "DepthToSpace", "Reshape", "Transpose"}:
        moves.append(node.op_type)
        node = producer[node.input[0]]
    assert "DepthToSpace" in moves and node.op_type == "QuantizeLinear"
