"""Dequantising a QDQ model's outputs last: the same numbers from the rewritten graph (run by
onnxruntime, against numpy's dequantise-then-move), only where the rewrite is exact; the INT8 export
applies it."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fcnseg.export.qdq_tail import dequantize_outputs_last  # noqa: E402

SCALE, ZERO = 0.37, 12


def _graph(scale: np.ndarray, *, extra_use: bool = False, pad: bool = False) -> onnx.ModelProto:
    """uint8 (1, 8, 3, 4) -> DequantizeLinear -> [Pad] -> DepthToSpace(2) -> Slice (rows 1..5) -> output."""
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["deq"], name="dq"),
             helper.make_node("DepthToSpace", ["padded" if pad else "deq"], ["moved"], blocksize=2, name="d2s"),
             helper.make_node("Slice", ["moved", "starts", "ends", "axes"], ["out"], name="crop")]
    if pad:
        nodes.insert(1, helper.make_node("Pad", ["deq", "pads"], ["padded"], name="pad"))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 8])]
    if extra_use:
        nodes.append(helper.make_node("Relu", ["moved"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 2, 6, 8]))
    inits = [numpy_helper.from_array(scale.astype(np.float32), "scale"),
             numpy_helper.from_array(np.full(scale.shape, ZERO, dtype=np.uint8), "zero"),
             numpy_helper.from_array(np.array([1]), "starts"), numpy_helper.from_array(np.array([5]), "ends"),
             numpy_helper.from_array(np.array([2]), "axes"),
             numpy_helper.from_array(np.zeros(8, dtype=np.int64), "pads")]
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 8, 3, 4])],
                              outputs, inits,
                              value_info=[helper.make_tensor_value_info("moved", TensorProto.FLOAT, [1, 2, 6, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, q: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"q": q})


def _expected(q: np.ndarray) -> np.ndarray:
    """Dequantise, DepthToSpace (DCR order, as ONNX defines it), crop rows 1..5: in numpy."""
    x = (q.astype(np.float32) - ZERO) * np.float32(SCALE)
    n, c, h, w = x.shape
    x = x.reshape(n, 2, 2, c // 4, h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // 4, h * 2, w * 2)
    return x[:, :, 1:5]


def test_the_output_is_dequantised_last_with_the_same_numbers():
    q = np.random.default_rng(0).integers(0, 256, (1, 8, 3, 4), dtype=np.uint8)
    model = _graph(np.array(SCALE))
    before = _run(model, q)[0]
    assert dequantize_outputs_last(model) == 1
    onnx.checker.check_model(model)
    assert [node.name for node in model.graph.node] == ["d2s", "crop", "dq"]
    assert model.graph.node[-1].output[0] == "out"
    assert "moved" not in {info.name for info in model.graph.value_info}  # its float type would now be wrong
    after = _run(model, q)[0]
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after, _expected(q), rtol=1e-6)


@pytest.mark.parametrize("case", ["per-channel scale", "tensor used twice", "pad in the way"])
def test_graphs_where_moving_is_not_exact_are_left_alone(case):
    scale = np.full(8, SCALE) if case == "per-channel scale" else np.array(SCALE)
    model = _graph(scale, extra_use=case == "tensor used twice", pad=case == "pad in the way")
    names = [node.name for node in model.graph.node]
    assert dequantize_outputs_last(model) == 0
    assert [node.name for node in model.graph.node] == names
