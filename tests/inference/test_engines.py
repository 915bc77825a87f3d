"""The optional engines ("onnxruntime", "openvino", "auto") against the torch engine: same logits and
masks in whole and sliding mode, precision handling, exported files as segmenters, missing packages."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fcnseg.errors import OptionError, UsageError
from fcnseg.inference import backends
from fcnseg.inference.backends import EngineRequest, auto_choice, make_engine
from fcnseg.inference.segmenter import Segmenter
from tests.conftest import gradient_photo, three_class_tiny_fcn

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]
ENGINES = ["onnxruntime", "openvino"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return three_class_tiny_fcn()


def _require(name: str) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip(name)


@pytest.fixture(scope="module")
def segmenters(model):
    """name -> float32 segmenters in whole and sliding mode, each engine built once for the module."""
    built = {}
    for name in ["torch", *ENGINES]:
        try:
            engine = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend=name).engine
        except OptionError:  # not installed: the tests of that engine skip
            continue
        built[name] = {mode: Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", mode=mode, backend="torch",
                                       window=(48, 64), stride=(32, 40)) for mode in ("whole", "sliding")}
        for segmenter in built[name].values():
            segmenter.engine, segmenter.backend = engine, name
    return built


@pytest.mark.parametrize("mode", ["whole", "sliding"])
@pytest.mark.parametrize("name", ENGINES)
def test_engine_matches_torch(segmenters, name, mode):
    _require(name)
    torch_segmenter, engine_segmenter = segmenters["torch"][mode], segmenters[name][mode]
    # A batch of one odd-sized photo and a batch of two: the engines take any N, H and W.
    batches = [[gradient_photo(67, 93, seed=1)], [gradient_photo(64, 96, seed=2), gradient_photo(64, 96, seed=3)]]
    for photos in batches:
        image = torch.stack([torch_segmenter.preprocess(photo) for photo in photos])
        assert len(torch_segmenter.logits(image).argmax(1).unique()) == 3  # the masks compared are not constant
        want, got = torch_segmenter.logits(image), engine_segmenter.logits(image)
        assert got.shape == want.shape == (len(photos), 3, *photos[0].shape[:2]) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        agreement = float((got.argmax(1) == want.argmax(1)).float().mean())
        assert agreement >= 0.999


@pytest.mark.parametrize("name", ENGINES)
def test_engine_is_built_by_segmenter_and_predicts(model, name):
    _require(name)
    segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend=name, flip=True)
    reference = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", flip=True, backend="torch")
    photo = gradient_photo(50, 70, seed=4)
    assert segmenter.backend == name and segmenter.engine is not segmenter.model
    assert np.mean(segmenter.predict(photo) == reference.predict(photo)) >= 0.999


def test_compiled_torch_engine_freezes_and_matches_eager(model, monkeypatch):
    """``Segmenter(compile=True)``: torch.compile with inductor's freezing on while it compiles
    (the weights folded into prepacked convolutions), same logits as the eager model."""
    import torch._inductor.config as inductor_config

    seen = []
    original = torch.compile

    def recording_compile(module, **kwargs):
        compiled = original(module, **kwargs)

        def call(batch):
            seen.append((inductor_config.freezing, torch.get_num_threads()))
            return compiled(batch)
        return call

    monkeypatch.setattr(torch, "compile", recording_compile)
    segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", compile=True)
    reference = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none")
    image = reference.preprocess(gradient_photo(64, 96, seed=5)).unsqueeze(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # torch computes: the segmenter must not take its threads as for a foreign engine
    try:
        got = segmenter.logits(image)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, reference.logits(image), atol=1e-4, rtol=1e-4)
    assert seen == [(True, 2)] and inductor_config.freezing is False  # on for the call only


def test_onnxruntime_runs_float32_for_bf16_with_a_warning(model):
    _require("onnxruntime")
    with pytest.warns(RuntimeWarning, match="onnxruntime engine runs float32 here, not bfloat16"):
        engine = make_engine("onnxruntime", EngineRequest(model, torch.device("cpu"), torch.bfloat16))
    image = torch.randn(1, 3, 40, 56)
    with torch.inference_mode():
        torch.testing.assert_close(engine(image), model(image), atol=1e-4, rtol=1e-4)


def test_openvino_precision_follows_the_dtype(model):
    _require("openvino")
    from fcnseg.inference.onnx_engine import model_to_onnx
    from fcnseg.inference.openvino_engine import compile_onnx, cpu_capabilities, inference_precision

    assert inference_precision(None) == "f32" and inference_precision(torch.float32) == "f32"
    if "BF16" not in cpu_capabilities():
        with pytest.warns(RuntimeWarning, match="openvino engine runs float32"):
            assert inference_precision(torch.bfloat16) == "f32"
        return
    assert inference_precision(torch.bfloat16) == "bf16"
    compiled = compile_onnx(model_to_onnx(model), "bf16")
    import openvino

    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16
    f32 = compile_onnx(model_to_onnx(model), "f32")
    assert f32.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    image = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        got = torch.from_numpy(compiled(image.numpy())[0])
        want = model(image)
    # bf16 keeps 8 bits of mantissa: close to float32, not equal to it.
    assert 0 < float((got - want).abs().max()) < 0.1 * float(want.abs().max())
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) > 0.95


@pytest.mark.parametrize("name", ENGINES)
def test_missing_package_names_the_extra(model, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail as if not installed
    with pytest.raises(OptionError, match=rf"backend '{name}' needs the package '{name}': "
                                          rf"pip install 'fcnseg\[{name}\]'"):
        Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend=name)


def test_unknown_backend_lists_the_choices(model):
    with pytest.raises(OptionError, match="unknown backend 'tensorrt'; choose one of torch, auto, onnxruntime"):
        Segmenter(model, CLASSES, COLORS, device="cpu", backend="tensorrt")


def test_auto_takes_the_first_installed_engine_of_its_order(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(backends, "AUTO_ORDER", {"float32": ("openvino", "torch"), "bfloat16": ("nosuchengine",)})
    installed = {"openvino": True}
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    assert auto_choice(cpu, None) == auto_choice(cpu, torch.float32) == "openvino"
    installed["openvino"] = False
    assert auto_choice(cpu, None) == "torch"
    assert auto_choice(cpu, torch.bfloat16) == "torch"  # nothing of its order installed
    assert auto_choice(cpu, torch.float16) == "torch"  # a precision without an order
    assert auto_choice(torch.device("meta"), None) == "torch"  # not the CPU


def test_auto_builds_its_choice_and_predicts_as_torch(model):
    choice = auto_choice(torch.device("cpu"), None)
    segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none")  # "auto" is the default
    reference = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend="torch")
    assert segmenter.backend == "auto" and (segmenter.engine is segmenter.model) == (choice == "torch")
    photo = gradient_photo(45, 61, seed=5)
    assert np.mean(segmenter.predict(photo) == reference.predict(photo)) >= 0.999


def test_auto_compiles_with_torch(model, monkeypatch):
    monkeypatch.setattr(backends, "auto_choice", lambda device, dtype: pytest.fail("compile=True must not ask"))
    segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", compile=True)
    assert isinstance(segmenter.engine, backends.FrozenCompiled)


def test_auto_falls_back_to_torch_when_the_engine_cannot_take_the_model(model, monkeypatch):
    _require("openvino")
    from fcnseg.errors import FcnsegError
    from fcnseg.inference import openvino_engine

    def refuse(_model):
        raise FcnsegError("torch.onnx.export (legacy) failed: unsupported operator")

    monkeypatch.setattr(backends, "AUTO_ORDER", {"float32": ("openvino", "torch")})
    monkeypatch.setattr(openvino_engine, "model_to_onnx", refuse)
    with pytest.warns(RuntimeWarning, match="backend 'auto': openvino cannot run this model .*; using torch"):
        segmenter = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", backend="auto")
    assert segmenter.engine is segmenter.model


@pytest.mark.parametrize("name", ENGINES)
def test_exported_file_is_a_segmenter(model, tmp_path, name):
    _require(name)
    pytest.importorskip("onnxruntime")
    from fcnseg.export.onnx import export_onnx
    from fcnseg.inference.onnx_engine import onnx_segmenter

    path = tmp_path / "tiny.onnx"
    export_onnx(model, path, classes=CLASSES, colors=COLORS, exporter="legacy", verify=False)
    segmenter = onnx_segmenter(path, backend=name, mode="sliding", window=(48, 64))
    assert segmenter.classes == CLASSES and segmenter.colors == COLORS
    reference = Segmenter(model, CLASSES, COLORS, device="cpu", amp="none", mode="sliding", window=(48, 64))
    photo = gradient_photo(70, 90, seed=6)
    np.testing.assert_allclose(segmenter.predict_proba(photo), reference.predict_proba(photo), atol=1e-4)


def test_onnx_file_without_metadata_or_missing_is_refused(tmp_path):
    pytest.importorskip("onnx")
    from fcnseg.inference.onnx_engine import onnx_segmenter

    with pytest.raises(UsageError, match="does not exist"):
        onnx_segmenter(tmp_path / "absent.onnx")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(UsageError, match="holds no fcnseg metadata"):
        onnx_segmenter(tmp_path / "plain.onnx")
