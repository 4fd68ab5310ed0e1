"""Float zero points on ONNX Runtime's CPU provider, exactly and at MatMulNBits' integer speed.

MatMulNBits takes float zero points, but ONNX Runtime's CPU kernel then takes a slow path: 20 to 48x
slower for a SmolLM2 gate/up matmul at one row (benchmarks/experiments/float_zero_kernel.py). So each such node is
split into the fast integer kernel plus a small correction that restores the fractional part:

    w = s * (q - z)  =  s * (q - round(z))  +  s * (round(z) - z)          per block of G inputs
    y = x @ wᵀ       =  MatMulNBits(x; q, s, round(z))  +  (x @ E) @ C

where E [K, blocks] sums x over each block (0/1 entries) and C [blocks, N] = s * (round(z) - z).
The result is the float-zero-point product up to float rounding; the correction costs two small
matmuls and an add per quantized linear. The export writes this form into every graph: it runs the
same on every provider and in every engine that reads our ONNX (onnxruntime-genai, optimum).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.graph.lazy import tensor_array
from pipeline.graph.quant_ops import drop_unused_initializers
from pipeline.quant.primitives import pack_zero_points


def lower_float_zero_points(model: onnx.ModelProto, weights: Mapping[str, np.ndarray] | None = None) -> int:
    """Rewrite every MatMulNBits with float zero points in place; returns how many were rewritten. `weights`:
    where the graph's placeholders read from (pipeline/graph/lazy.py)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, rewritten = [], 0
    sums: dict[tuple[int, int], str] = {}  # one block-sum matrix per (K, G), shared by the layers
    for node in graph.node:
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zp is None or zp.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, g = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        blocks = -(-k // g)
        scales = tensor_array(inits[node.input[2]], weights)
        dtype = scales.dtype
        scale = scales.astype(np.float32).reshape(n, blocks)
        zero = tensor_array(zp, weights).astype(np.float32).reshape(n, blocks)
        rounded = np.clip(np.round(zero), 0, 2**bits - 1)
        if (k, g) not in sums:
            e = np.zeros((k, blocks), dtype)
            e[np.arange(k), np.arange(k) // g] = 1
            sums[(k, g)] = f"float_zero.block_sums.K{k}.G{g}"
            graph.initializer.append(numpy_helper.from_array(e, sums[(k, g)]))
        name = node.name
        graph.initializer.extend(
            [
                numpy_helper.from_array(pack_zero_points(rounded.astype(np.uint8), bits), f"{name}.zero_points_int"),
                numpy_helper.from_array(
                    np.ascontiguousarray((scale * (rounded - zero)).T.astype(dtype)), f"{name}.zero_correction"
                ),
            ]
        )
        out = node.output[0]
        node.input[3] = f"{name}.zero_points_int"
        node.output[0] = f"{name}/integer_zero"
        nodes.append(node)
        nodes.append(
            helper.make_node("MatMul", [node.input[0], sums[(k, g)]], [f"{name}/block_sums"], name=f"{name}/BlockSums")
        )
        nodes.append(
            helper.make_node(
                "MatMul",
                [f"{name}/block_sums", f"{name}.zero_correction"],
                [f"{name}/correction"],
                name=f"{name}/ZeroCorrection",
            )
        )
        nodes.append(
            helper.make_node("Add", [f"{name}/integer_zero", f"{name}/correction"], [out], name=f"{name}/AddCorrection")
        )
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return rewritten
