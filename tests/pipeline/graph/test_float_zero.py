"""The CPU form of float zero points: integer MatMulNBits plus a block-sum correction, equal to the float product."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.graph.float_zero import lower_float_zero_points
from pipeline.quant.primitives import QuantScheme, dequantize, pack_matmul_nbits, quantize


def _model(packed: dict, k: int, n: int, group: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(packed[key], key) for key in ("B", "scales", "zero_points")]
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales", "zero_points"],
        ["Y"],
        name="/model/proj/MatMulNBits",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=group,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def _run(model: onnx.ModelProto, a: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


@pytest.mark.parametrize("k, group", [(64, 32), (96, 64), (200, 16)])  # 96/64 and 200/16 pad their last block
def test_lowered_graph_computes_the_float_zero_point_product(k, group):
    torch.manual_seed(0)
    n = 24
    w = torch.randn(n, k) * 0.05 + torch.rand(n, 1) * 0.1  # offset rows: some blocks do not straddle zero
    qt = quantize(w, QuantScheme(4, group, False, float_zero=True))
    a = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    expected = a @ dequantize(qt).numpy().T
    model = _model(pack_matmul_nbits(qt), k, n, group)
    np.testing.assert_allclose(_run(model, a), expected, atol=1e-5)  # ONNX Runtime's slow float path
    assert lower_float_zero_points(model) == 1
    nbits = next(node for node in model.graph.node if node.op_type == "MatMulNBits")
    zp = next(t for t in model.graph.initializer if t.name == nbits.input[3])
    assert zp.data_type == TensorProto.UINT8  # the fast integer kernel
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits", "MatMul", "MatMul", "Add"]
    np.testing.assert_allclose(_run(model, a), expected, atol=1e-5)
    assert lower_float_zero_points(model) == 0  # nothing left to lower


def test_integer_zero_points_are_left_alone():
    qt = quantize(torch.randn(8, 64), QuantScheme(4, 32, False))
    model = _model(pack_matmul_nbits(qt), 64, 8, 32)
    assert lower_float_zero_points(model) == 0 and len(model.graph.node) == 1
