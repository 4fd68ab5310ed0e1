"""Primitives: exact pack round trips and MatMulNBits computing the dequantized matmul."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.quant.primitives import QuantScheme, dequantize, pack_matmul_nbits, quantize, unpack_matmul_nbits


def matmul_nbits_session(packed: dict, k: int, n: int, scheme: QuantScheme):
    inputs = ["A", "B", "scales"] + (["zero_points"] if "zero_points" in packed else [])
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=scheme.bits, block_size=scheme.group_size
    )
    inits = [numpy_helper.from_array(packed[name], name) for name in inputs[1:]]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_equals_dequantized_matmul(bits, group, symmetric):
    torch.manual_seed(0)
    n, k = 24, 200  # 200 is not a multiple of any group size: the last block is padded
    w = torch.randn(n, k)
    scheme = QuantScheme(bits, group, symmetric)
    qt = quantize(w, scheme)
    a = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    expected = a @ dequantize(qt).numpy().T
    got = matmul_nbits_session(pack_matmul_nbits(qt), k, n, scheme).run(None, {"A": a})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_codes_are_in_range_and_error_is_bounded():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    for scheme in (QuantScheme(4, 32, False), QuantScheme(4, 32, True)):
        qt = quantize(w, scheme)
        assert int(qt.q.max()) <= 15
        err = (dequantize(qt) - w).abs()
        step = qt.scale.repeat_interleave(32, dim=1)
        assert (err <= step * 0.5 + 1e-6).float().mean() > 0.99  # rounding error at most half a step


def test_int8_is_far_more_accurate_than_int4():
    torch.manual_seed(2)
    w = torch.randn(64, 256)
    e4 = (dequantize(quantize(w, QuantScheme(4, 32, False))) - w).pow(2).mean()
    e8 = (dequantize(quantize(w, QuantScheme(8, 32, False))) - w).pow(2).mean()
    assert e8 < e4 / 100


def test_asymmetric_grid_is_refound_exactly():
    """Weights that already lie on an asymmetric 4-bit grid with integer zero points come back exactly."""
    torch.manual_seed(3)
    codes = torch.randint(0, 16, (8, 64)).float()
    codes[:, 0::32] = 0
    codes[:, 1::32] = 15  # every group spans the full range
    scale = torch.rand(8, 2) + 0.1
    zero = torch.randint(0, 16, (8, 2)).float()
    w = (codes.reshape(8, 2, 32) - zero[..., None]) * scale[..., None]
    qt = quantize(w.reshape(8, 64), QuantScheme(4, 32, False))
    torch.testing.assert_close(dequantize(qt), w.reshape(8, 64), atol=1e-5, rtol=1e-5)


def test_mse_clip_search_never_increases_the_rounding_error():
    from pipeline.quant.primitives import choose_qparams, choose_qparams_mse, fake_quantize, to_groups

    torch.manual_seed(4)
    w = torch.randn(32, 256) * torch.rand(32, 1)
    w[0, 0] = 12.0  # an outlier stretches its group's range
    scheme = QuantScheme(4, 32, False)
    g = to_groups(w, 32)
    errs = []
    for choose in (choose_qparams, choose_qparams_mse):
        scale, zero = choose(g, scheme)
        errs.append((fake_quantize(g, scale[..., None], zero[..., None], 15) - g).abs().pow(2.4).sum(-1))
    assert (errs[1] <= errs[0] + 1e-6).all() and errs[1].sum() < errs[0].sum()


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False), (8, True)])
def test_unpacking_matmul_nbits_gives_back_the_codes(bits, symmetric):
    scheme = QuantScheme(bits, 32, symmetric)
    qt = quantize(torch.randn(6, 96), scheme)  # 3 blocks a row: an odd count pads the 4-bit zero points
    packed = {f"layer.{k}": v for k, v in pack_matmul_nbits(qt).items()}
    q, scale, zero = unpack_matmul_nbits(
        packed, "layer", {"N": 6, "K": 96, "bits": bits, "group_size": 32, "symmetric": symmetric}
    )
    np.testing.assert_array_equal(q, qt.q.numpy())
    np.testing.assert_array_equal(scale, qt.scale.numpy())
    np.testing.assert_array_equal(zero, qt.zero.numpy().astype(np.uint8))


def test_float_zero_points_refind_a_grid_that_integer_zero_points_cannot():
    """Weights on llama.cpp's Q4_1 grid (d * q + m, any float m) come back exactly with float zero points."""
    torch.manual_seed(5)
    codes = torch.randint(0, 16, (8, 2, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans the full range
    d, m = torch.rand(8, 2, 1) * 0.1 + 0.01, torch.randn(8, 2, 1) * 0.1
    w = (codes * d + m).reshape(8, 64)
    exact = quantize(w, QuantScheme(4, 32, False, float_zero=True))
    torch.testing.assert_close(dequantize(exact), w, atol=1e-6, rtol=1e-6)
    integer = quantize(w, QuantScheme(4, 32, False))
    assert (dequantize(integer) - w).abs().max() > 100 * (dequantize(exact) - w).abs().max()


def test_float_zero_points_pack_as_floats_and_unpack_unchanged():
    scheme = QuantScheme(4, 32, False, float_zero=True)
    qt = quantize(torch.randn(6, 96), scheme)
    packed = pack_matmul_nbits(qt)
    assert packed["zero_points"].dtype == np.float32 and packed["zero_points"].shape == (6 * 3,)
    q, scale, zero = unpack_matmul_nbits(
        {f"l.{k}": v for k, v in packed.items()},
        "l",
        {"N": 6, "K": 96, "bits": 4, "group_size": 32, "symmetric": False, "float_zero": True},
    )
    np.testing.assert_array_equal(q, qt.q.numpy())
    np.testing.assert_array_equal(zero, qt.zero.numpy())
    with pytest.raises(ValueError, match="asymmetric blocks only"):
        QuantScheme(4, 32, True, float_zero=True)
