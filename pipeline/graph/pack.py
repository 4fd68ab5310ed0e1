"""Merge linear layers that read the same input into one wider matmul (fused graph only).

    x ─► MatMul(Wq), MatMul(Wk), MatMul(Wv)     becomes     x ─► MatMul([Wq Wk Wv]) ─► GroupQueryAttention (packed QKV)
    x ─► MatMul(Wg), MatMul(Wu)                 becomes     x ─► MatMul([Wg Wu]) ─► Split ─► gate, up

One wide matmul instead of two or three narrow ones: fewer kernel launches per token and better use
of the threads. MatMulNBits siblings merge when their bits, block size and symmetry agree: their
codes, scales and zero points are stored row by row over N, so the merged tensors are concatenations
and the dequantized weights are exactly the originals.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.graph.lazy import concat_lazy, is_lazy
from pipeline.graph.quant_ops import drop_unused_initializers

PACKABLE = ("MatMul", "MatMulNBits")


def pack_sibling_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite in place; returns how many groups were merged."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    siblings: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type in PACKABLE and node.input[0] not in inits and all(i in inits for i in node.input[1:]):
            siblings[node.input[0]].append(node)
    merged = 0
    for nodes in siblings.values():
        if len(nodes) < 2 or not _compatible(nodes):
            continue
        _merge(graph, nodes, inits)
        merged += 1
        drop_unused_initializers(graph)  # the merged weights replace the originals now, not after every merge
    return merged


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _compatible(nodes: list[onnx.NodeProto]) -> bool:
    first = nodes[0]
    if any(n.op_type != first.op_type or len(n.input) != len(first.input) for n in nodes):
        return False
    if first.op_type == "MatMulNBits":
        keys = ("K", "bits", "block_size", "accuracy_level")
        return all(_attrs(n).get(k) == _attrs(first).get(k) for n in nodes for k in keys)
    return True


def _widths(node: onnx.NodeProto, inits: dict) -> int:
    if node.op_type == "MatMulNBits":
        return _attrs(node)["N"]
    return inits[node.input[1]].dims[1]


def _merge(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], inits: dict) -> None:
    widths = [_widths(n, inits) for n in nodes]
    name = nodes[0].name.rsplit("/", 2)[0] + "/packed_" + "_".join(n.name.rsplit("/", 2)[-2] for n in nodes)
    tensors = []
    for slot in range(1, len(nodes[0].input)):
        parts = [inits[n.input[slot]] for n in nodes]
        axis = (
            1 if nodes[0].op_type == "MatMul" else 0
        )  # MatMul weights are [K, N]; MatMulNBits tensors run over N first
        if all(is_lazy(t) for t in parts):  # still in the checkpoint: the merged tensor names its parts
            tensors.append(concat_lazy(f"{name}.input_{slot}", parts, axis))
        else:
            arrays = [numpy_helper.to_array(t) for t in parts]
            tensors.append(numpy_helper.from_array(np.concatenate(arrays, axis=axis), f"{name}.input_{slot}"))
    graph.initializer.extend(tensors)
    attrs = _attrs(nodes[0])
    if "N" in attrs:
        attrs["N"] = sum(widths)
    packed_out = f"{name}/output_0"
    packed = helper.make_node(
        nodes[0].op_type,
        [nodes[0].input[0], *[t.name for t in tensors]],
        [packed_out],
        name=name,
        domain=nodes[0].domain or None,
        **attrs,
    )
    outputs = [n.output[0] for n in nodes]
    index = min(list(graph.node).index(n) for n in nodes)
    for n in nodes:
        graph.node.remove(n)
    gqa = _packed_qkv_consumer(graph, outputs)
    if gqa is not None:  # GroupQueryAttention takes packed QKV as its query, with key and value left empty
        gqa.input[0], gqa.input[1], gqa.input[2] = packed_out, "", ""
        graph.node.insert(index, packed)
        return
    sizes = numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{name}.split_sizes")
    graph.initializer.append(sizes)
    split = helper.make_node("Split", [packed_out, sizes.name], outputs, name=f"{name}/Split", axis=-1)
    graph.node.insert(index, packed)
    graph.node.insert(index + 1, split)


def _packed_qkv_consumer(graph: onnx.GraphProto, outputs: list[str]) -> onnx.NodeProto | None:
    """The GroupQueryAttention node fed exactly (q, k, v) by these outputs, and nothing else reading them."""
    if len(outputs) != 3:
        return None
    readers = [n for n in graph.node if any(i in outputs for i in n.input)]
    if len(readers) == 1 and readers[0].op_type == "GroupQueryAttention" and list(readers[0].input[:3]) == outputs:
        return readers[0]
    return None
