"""W8A8 on the traced float graph (CPU provider).

    dynamic:           ONNX Runtime's quantizer: MatMul -> DynamicQuantizeLinear + MatMulInteger
                       (one asymmetric uint8 range per activation tensor, found per run)
    dynamic_per_token: our rewrite: one symmetric int8 scale per token, MatMulInteger on int8 x int8
                       (llm-compressor's and vLLM's dynamic scheme)
    static:            our rewrite: one symmetric int8 scale per linear input, calibrated by the quantize
                       stage (clipped max |x|), QuantizeLinear then MatMulInteger (their static scheme)

Weights are int8 per output channel in all three. Our two rewrites store both operands as uint8
(codes + 128), exact on every x86 CPU; ONNX Runtime's dynamic mode keeps its uint8 x int8 pairs, which
saturate on AVX2 CPUs without VNNI (its documentation's reduce_range caveat).

Only the decoder's linear layers the quantize stage
lists are quantized (its ignore list keeps others float): the attention's own matmuls (activation × activation: scores and weighted values) and the LM head stay
float, as in SmoothQuant and llm-compressor; quantizing the scores per tensor ruins the model.
Run after the export's float parity check.

ONNX Runtime's own static mode (QDQ, MinMax ranges) was the static path until our rewrite replaced
it: on SmolLM2 with SmoothQuant auto it measured +168 % perplexity, mostly because its graph also
rounds every linear's output to uint8 and its MinMax ranges are set by a few outlier tokens.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from pipeline.errors import StageError
from pipeline.graph.quant_ops import module_of
from pipeline.quant.rotation import hadamard, rotate


def linear_nodes(path: Path, modules: list[str]) -> list[str]:
    """Names of the MatMul nodes of these linear layers (weight from an initializer)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    nodes = [
        n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights and module_of(n.name) in modules
    ]
    if len(nodes) != len(modules):
        raise StageError(f"export: found {len(nodes)} of the {len(modules)} W8A8 linears in the graph")
    return nodes


def quantize_w8a8(
    path: Path,
    mode: str,
    modules: list[str],
    input_scales: dict[str, float] | None = None,
    rotations: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """The quantized graph of the float model at `path` (returned in memory, weights loaded).
    `input_scales`: static mode's calibrated scale per linear; `rotations`: the linears whose input
    is rotated by a block Hadamard of that width (both from the quantize stage's plan)."""
    if mode == "dynamic_per_token":
        return quantize_int8_linears(path, modules, rotations=rotations)
    if mode == "static":
        if not input_scales:
            raise StageError("export: static W8A8 needs the quantize stage's input_scales (re-run quantize)")
        return quantize_int8_linears(path, modules, input_scales, rotations)
    if rotations:
        raise StageError(
            "export: ONNX Runtime's dynamic W8A8 cannot take hadamard rotations (ours, per token or static, can)"
        )
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(
            path,
            out,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=linear_nodes(path, set(modules)),
            per_channel=True,
            use_external_data_format=True,
        )
        return onnx.load(str(out))


def quantize_int8_linears(
    path: Path,
    modules: list[str],
    input_scales: dict[str, float] | None = None,
    rotations: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """W8A8, our own rewrite of each linear's MatMul(x, W); by default one activation scale per token:

        s_x = max(|x|, last axis) / 127          q_x = clip(round(x / s_x), -127, 127)
        s_w = max(|W|, per output column) / 127  W_q = int8(round(W / s_w))           (computed here, once)
        y   = float(MatMulInteger(uint8(q_x + 128), uint8(W_q + 128), a_zero_point=128, b_zero_point=128)) * s_x * s_w

    Both sides' codes travel as uint8 with zero point 128, the same integers as int8. ONNX Runtime's
    CPU kernels have fast paths for uint8 x int8 and uint8 x uint8 only (int8 x int8 measured 19-28x
    slower on an AVX-512 machine, a portable fallback). uint8 x int8 is not exact everywhere: on x86
    CPUs with AVX2 but no VNNI it sums pairs of products in saturating 16-bit lanes (vpmaddubsw), and
    255 x 127 x 2 overflows them (measured: 24 % error on an AVX2-only AMD EPYC, the accuracy gate
    failed there). uint8 x uint8 widens first and is exact on every CPU; on that machine it takes
    2.2x the time at 1 row and 1.2x at 256 (benchmarks/experiments/matmul_integer_kernels.py).

    ONNX Runtime's dynamic mode shares one (asymmetric) range across the whole activation tensor, so
    one outlier token coarsens every other token's rounding; per token, each row gets its own. This
    is the dynamic scheme of llm-compressor and vLLM. Linears fed the same tensor (q/k/v, gate/up)
    share its quantization. Node and initializer names follow ONNX Runtime's dynamic mode
    (`<MatMul>_quant`, `<W>_quantized`, `<W>_scale`), so `read_w8a8_codes` reads both.

    With `input_scales` (module -> s_x, static W8A8) the scale is a constant instead:
    q_x = QuantizeLinear(x, s_x, zero point 128), codes in [-128, 127] shifted to uint8; the rest is
    the same.

    With `rotations` (module -> block width b), that linear's input is first rotated in float by the
    block-diagonal Hadamard Q (x -> rows of b -> MatMul(H_b) -> x's shape) and its weight to match
    (W -> Qᵀ W, before quantization): the same product in float, outliers spread before rounding."""
    model = onnx.load(str(path))
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inits = {t.name: t for t in graph.initializer}
    targets = set(linear_nodes(path, set(modules)))
    per_token = (
        ("w8a8_127", 127.0, np.float32),
        ("w8a8_neg127", -127.0, np.float32),
        ("w8a8_eps", 1e-8, np.float32),
        ("w8a8_128", 128.0, np.float32),
    )
    consts = [
        numpy_helper.from_array(np.array(v, dtype=t), name=n)
        for n, v, t in ((*per_token,) if input_scales is None else ()) + (("w8a8_zero_point", 128, np.uint8),)
    ]
    if opset >= 18 and input_scales is None:
        consts.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), name="w8a8_last_axis"))
    quantized_inputs: dict[str, tuple[str, str]] = {}  # float input -> (uint8 codes, per-token or static scale)
    static_scales: dict[str, float] = {}
    nodes, dropped = [], set()
    for node in graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        x, w_name = node.input
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)  # [K, N]
        if block := (rotations or {}).get(module_of(node.name)):
            if f"{x}_rotated" not in quantized_inputs:
                nodes += _rotation_nodes(x, block, consts)
            x = f"{x}_rotated"
            w = np.ascontiguousarray(rotate(torch.from_numpy(np.ascontiguousarray(w.T)), block).numpy().T)  # Qᵀ W
        scale = None if input_scales is None else float(input_scales[module_of(node.name)])
        if x not in quantized_inputs and scale is None:
            nodes += _per_token_nodes(x, opset)
            quantized_inputs[x] = (f"{x}_q_uint8", f"{x}_token_scale")
        elif x not in quantized_inputs:
            consts.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), name=f"{x}_static_scale"))
            nodes.append(
                onnx.helper.make_node(
                    "QuantizeLinear",
                    [x, f"{x}_static_scale", "w8a8_zero_point"],
                    [f"{x}_q_uint8"],
                    name=f"{x}_QuantizeLinear",
                )
            )
            quantized_inputs[x] = (f"{x}_q_uint8", f"{x}_static_scale")
            static_scales[x] = scale
        elif scale is not None and scale != static_scales[x]:
            raise StageError(f"export: the linears fed by {x} were calibrated to different input scales")
        q_x, s_x = quantized_inputs[x]
        s_w = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
        w_q = np.clip(np.round(w / s_w), -127, 127).astype(np.int16)
        consts += [
            numpy_helper.from_array((w_q + 128).astype(np.uint8), name=f"{w_name}_quantized"),
            numpy_helper.from_array(s_w.astype(np.float32), name=f"{w_name}_scale"),
        ]
        dropped.add(w_name)
        y = node.output[0]
        nodes += [
            onnx.helper.make_node(
                "MatMulInteger",
                [q_x, f"{w_name}_quantized", "w8a8_zero_point", "w8a8_zero_point"],
                [f"{y}_int32"],
                name=f"{node.name}_quant",
            ),
            onnx.helper.make_node("Cast", [f"{y}_int32"], [f"{y}_float"], to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Mul", [f"{y}_float", s_x], [f"{y}_token_scaled"]),
            onnx.helper.make_node("Mul", [f"{y}_token_scaled", f"{w_name}_scale"], [y]),
        ]
    still_used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in still_used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + consts)
    return model


def _rotation_nodes(x: str, block: int, consts: list) -> list[onnx.NodeProto]:
    """x -> `{x}_rotated`: x Q for Q = diag(H_b, …, H_b) along the last axis, any rank."""
    make = onnx.helper.make_node
    if not any(c.name == f"w8a8_hadamard_{block}" for c in consts):
        consts += [
            numpy_helper.from_array(hadamard(block), name=f"w8a8_hadamard_{block}"),
            numpy_helper.from_array(np.array([-1, block], dtype=np.int64), name=f"w8a8_rows_of_{block}"),
        ]
    return [
        make("Shape", [x], [f"{x}_shape"]),
        make("Reshape", [x, f"w8a8_rows_of_{block}"], [f"{x}_blocks"]),
        make("MatMul", [f"{x}_blocks", f"w8a8_hadamard_{block}"], [f"{x}_blocks_rotated"]),
        make("Reshape", [f"{x}_blocks_rotated", f"{x}_shape"], [f"{x}_rotated"]),
    ]


def _per_token_nodes(x: str, opset: int) -> list[onnx.NodeProto]:
    """x -> codes `{x}_q_uint8` (int8 codes + 128) and scales `{x}_token_scale` [..., 1], one per row of the last axis."""
    make = onnx.helper.make_node
    reduce = (
        make("ReduceMax", [f"{x}_abs", "w8a8_last_axis"], [f"{x}_absmax"], keepdims=1)
        if opset >= 18
        else make("ReduceMax", [f"{x}_abs"], [f"{x}_absmax"], axes=[-1], keepdims=1)
    )
    return [
        make("Abs", [x], [f"{x}_abs"]),
        reduce,
        make("Max", [f"{x}_absmax", "w8a8_eps"], [f"{x}_absmax_safe"]),
        make("Div", [f"{x}_absmax_safe", "w8a8_127"], [f"{x}_token_scale"]),
        make("Div", [x, f"{x}_token_scale"], [f"{x}_scaled"]),
        make("Round", [f"{x}_scaled"], [f"{x}_rounded"]),
        make("Clip", [f"{x}_rounded", "w8a8_neg127", "w8a8_127"], [f"{x}_clipped"]),
        make("Add", [f"{x}_clipped", "w8a8_128"], [f"{x}_shifted"]),
        make("Cast", [f"{x}_shifted"], [f"{x}_q_uint8"], to=onnx.TensorProto.UINT8),
    ]


@dataclass
class W8A8Codes:
    """What a W8A8 graph holds for one linear (ONNX Runtime's quantizer or our per-token rewrite): the codes
    other formats copy."""

    weight: np.ndarray  # int8 [N, K] (out, in), symmetric: zero point 0
    scale: np.ndarray  # float32 [N], per output channel
    input_scale: float | None = None  # static: the calibrated per-tensor activation scale
    input_zero_point: int | None = None  # static: its uint8 zero point


def read_w8a8_codes(path: Path, modules: list[str]) -> dict[str, W8A8Codes]:
    """The int8 weights and per-channel scales of each of `modules` in the W8A8 graph at `path`, and for
    static graphs each linear's calibrated input range.

        dynamic (and per token): MatMulInteger(x_q, W_q [K, N][, x_zp, W_zp])   W_scale = initializer '<W>_scale'
        static (ours): the same, x_q = QuantizeLinear(x, s, zp) with s, zp initializers
        static (ONNX Runtime's QDQ, older artifacts): MatMul(DequantizeLinear(x_q, s, zp), DequantizeLinear(W_q, W_scale, W_zp))
    """
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    array = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    codes: dict[str, W8A8Codes] = {}
    for node in graph.node:
        if node.op_type == "MatMulInteger" and (module := module_of(node.name, "MatMul_quant")) in modules:
            base = node.input[1].removesuffix("_quantized")
            zero = array(node.input[3]) if len(node.input) > 3 else np.zeros(1, np.int8)  # older graphs: int8, none
            codes[module] = _codes(array(node.input[1]), array(f"{base}_scale"), zero, module)
            x_q = producer.get(node.input[0])
            if x_q is not None and x_q.op_type == "QuantizeLinear" and x_q.input[1] in inits:
                codes[module].input_scale = float(array(x_q.input[1]))
                codes[module].input_zero_point = int(array(x_q.input[2]))
        elif node.op_type == "MatMul" and (module := module_of(node.name)) in modules:
            w_dq, x_dq = producer.get(node.input[1]), producer.get(node.input[0])
            if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in inits:
                continue  # left float by ONNX Runtime: reported below as missing
            codes[module] = _codes(array(w_dq.input[0]), array(w_dq.input[1]), array(w_dq.input[2]), module)
            if x_dq is not None and x_dq.op_type == "DequantizeLinear" and x_dq.input[1] in inits:
                codes[module].input_scale = float(array(x_dq.input[1]))
                codes[module].input_zero_point = int(array(x_dq.input[2]))
    missing = [m for m in modules if m not in codes]
    if missing:
        raise StageError(f"{path}: no int8 weights found for {len(missing)} W8A8 linears (first: {missing[0]})")
    return codes


def _codes(w_q: np.ndarray, scale: np.ndarray, zero: np.ndarray, module: str) -> W8A8Codes:
    if w_q.dtype == np.uint8 and np.all(zero == 128):  # ours: int8 codes + 128
        w_q, zero = (w_q.astype(np.int16) - 128).astype(np.int8), np.zeros(1, np.int8)
    if w_q.dtype != np.int8 or np.any(zero != 0):
        raise StageError(
            f"{module}: expected symmetric int8 weights from ONNX Runtime, got {w_q.dtype} with "
            f"{'nonzero' if np.any(zero != 0) else 'zero'} zero points"
        )
    return W8A8Codes(np.ascontiguousarray(w_q.T), scale.astype(np.float32).reshape(-1))
