"""Swap the float ops of quantized layers for ONNX Runtime's block-quantized contrib ops.

    x   ─► MatMul(x, Wᵀ) ─► y     becomes   x   ─► MatMulNBits(x, B, scales[, zero_points]) ─► y
    ids ─► Gather(E, ids) ─► h    becomes   ids ─► GatherBlockQuantized(E_q, ids, scales[, zero_points]) ─► h

A tied embedding quantized like the LM head reads the head's tensors through Reshape
([V, k_blocks, blob] -> [V, k_blocks * blob]): one copy of the codes on disk.

The exporter names each linear's MatMul after its module (`/model/model/layers.0/mlp/up_proj/MatMul`);
every match is also checked to hold exactly the dequantized weight, so a renamed or reordered
graph cannot receive the wrong layer's codes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from safetensors import safe_open

from pipeline.checkpoint import FloatWeights, read_header
from pipeline.errors import StageError
from pipeline.graph.lazy import is_lazy, lazy_parts, lazy_tensor
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE

MS_DOMAIN = "com.microsoft"


EMBEDDING = "model.embed_tokens"


def module_of(node_name: str, op: str = "MatMul") -> str | None:
    """'/model/model/layers.0/mlp/up_proj/MatMul' -> 'model.layers.0.mlp.up_proj'."""
    if not node_name.startswith("/model/") or not node_name.endswith(f"/{op}"):
        return None
    return node_name[len("/model/") : -len(f"/{op}")].replace("/", ".")


def apply_block_quantized_ops(
    graph_model: onnx.ModelProto, quant_dir: Path, weights: Mapping[str, np.ndarray], accuracy_level: int
) -> int:
    """Rewrite in place; `weights` maps checkpoint tensor name -> dequantized float weight ([N, K] for a
    linear's). A graph weight still in the checkpoint (pipeline/graph/lazy.py) is checked by the tensor it
    names, any other by value. Returns ops swapped."""
    plan = json.loads((quant_dir / PLAN_FILE).read_text())["layers"]
    packed = _PackedTensors(quant_dir / PACKED_FILE, weights)
    graph = graph_model.graph
    inits = {t.name: t for t in graph.initializer}
    done: set[str] = set()
    for index, node in enumerate(list(graph.node)):
        name = module_of(node.name) if node.op_type == "MatMul" else None
        if name not in plan or name == EMBEDDING:
            continue
        spec, init = plan[name], inits.get(node.input[1])
        if init is None:
            raise StageError(f"export: MatMul of {name} has no weight initializer; cannot place MatMulNBits")
        if not _holds(init, f"{name}.weight", True, weights):
            raise StageError(f"export: the graph's weight for {name} is not the quantized weight; refusing to swap it")
        prefix = f"{name}.qweight"
        tensors = {key: f"{name}.{key}" for key in ("B", "scales", "zero_points") if f"{name}.{key}" in packed}
        inputs = [node.input[0]]
        for key, source in tensors.items():
            graph.initializer.append(packed.tensor(f"{prefix}.{key}", source))
            inputs.append(f"{prefix}.{key}")
        new = helper.make_node(
            "MatMulNBits",
            inputs,
            list(node.output),
            name=node.name + "NBits",
            domain=MS_DOMAIN,
            K=spec["K"],
            N=spec["N"],
            bits=spec["bits"],
            block_size=spec["group_size"],
            accuracy_level=accuracy_level,
        )
        graph.node.remove(node)
        graph.node.insert(index, new)
        done.add(name)
    if EMBEDDING in plan:
        _swap_embedding(graph, plan[EMBEDDING], packed, inits, weights)
        done.add(EMBEDDING)
    missing = sorted(set(plan) - done)
    if missing:
        raise StageError(f"export: no MatMul found for quantized layers {missing[:3]} ({len(missing)} in all)")
    drop_unused_initializers(graph)
    if not any(o.domain == MS_DOMAIN for o in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(done)


def set_accuracy_level(graph_model: onnx.ModelProto, level: int, int8_level: int | None = None) -> None:
    """MatMulNBits compute type: 0 float (as the dequantized matmul), 4 int8 activations (faster on CPU);
    `int8_level`, when given, for the 8-bit layers (whose float-compute kernel is slow on CPUs)."""
    for node in graph_model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next(a.i for a in node.attribute if a.name == "bits")
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = int8_level if bits == 8 and int8_level is not None else level


def _swap_embedding(graph: onnx.GraphProto, spec: dict, packed: _PackedTensors, inits: dict, weights: Mapping) -> None:
    index, node = next(
        (
            (i, n)
            for i, n in enumerate(graph.node)
            if n.op_type == "Gather" and module_of(n.name, "Gather") == EMBEDDING
        ),
        (None, None),
    )
    if node is None or node.input[0] not in inits:
        raise StageError("export: no Gather over the embedding weight found; cannot place GatherBlockQuantized")
    if not _holds(inits[node.input[0]], f"{EMBEDDING}.weight", False, weights):
        raise StageError("export: the graph's embedding is not the quantized embedding; refusing to swap it")
    rows = spec["N"]
    keys = [k for k in ("B", "scales", "zero_points") if f"{spec.get('shared_with') or EMBEDDING}.{k}" in packed]
    inputs = []
    if spec.get("shared_with"):
        shape = f"{EMBEDDING}.qweight.rows_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape))
        for key in keys:
            reshaped = f"{EMBEDDING}.qweight.{key}"
            graph.node.insert(
                index,
                helper.make_node(
                    "Reshape",
                    [f"{spec['shared_with']}.qweight.{key}", shape],
                    [reshaped],
                    name=f"/model/model/embed_tokens/Reshape_{key}",
                ),
            )
            index += 1
            inputs.append(reshaped)
    else:
        for key in keys:
            name = f"{EMBEDDING}.qweight.{key}"
            shape = packed.shape(f"{EMBEDDING}.{key}")
            graph.initializer.append(packed.tensor(name, f"{EMBEDDING}.{key}", [rows, math.prod(shape) // rows]))
            inputs.append(name)
    data, *rest = inputs
    new = helper.make_node(
        "GatherBlockQuantized",
        [data, node.input[1], *rest],
        list(node.output),
        name="/model/model/embed_tokens/GatherBlockQuantized",
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=1,
        block_size=spec["group_size"],
        bits=spec["bits"],
    )
    graph.node.remove(node)
    graph.node.insert(index, new)


class _PackedTensors:
    """The quantize stage's packed codes, scales and zero points as graph tensors. With a checkpoint to read
    them from when the graph is saved (FloatWeights holds them) they are placeholders (an 8B model's codes are
    4 GB or more); else they are read now."""

    def __init__(self, path: Path, weights: Mapping):
        self.path, self.weights = path, weights
        self.lazy = isinstance(weights, FloatWeights)
        self.header = read_header(path)[1]

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def shape(self, name: str) -> list[int]:
        return list(self.header[name]["shape"])

    def tensor(self, graph_name: str, name: str, shape: list[int] | None = None) -> onnx.TensorProto:
        shape = shape or self.shape(name)
        if self.lazy:
            return lazy_tensor(graph_name, [(name, False)], shape, dtype=self.weights.dtype(name))
        with safe_open(str(self.path), "np") as f:
            return numpy_helper.from_array(np.ascontiguousarray(f.get_tensor(name).reshape(shape)), graph_name)


def _holds(init: onnx.TensorProto, param: str, transposed: bool, weights: Mapping[str, np.ndarray]) -> bool:
    """Whether a graph initializer is checkpoint tensor `param` (transposed when so)."""
    if param == "lm_head.weight" and param not in weights:  # a tied head is the embedding
        param = f"{EMBEDDING}.weight"
    if is_lazy(init):
        return lazy_parts(init)[0] == [(param, transposed)]
    array = weights[param]
    return np.array_equal(numpy_helper.to_array(init), array.T if transposed else array)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Delete the initializers no node reads, in place: the kept ones are never copied (taking them out
    and putting them back would hold every weight twice)."""
    used = {i for n in graph.node for i in _inputs(n)} | {o.name for o in graph.output}
    for index in reversed([i for i, t in enumerate(graph.initializer) if t.name not in used]):
        del graph.initializer[index]


def _inputs(node: onnx.NodeProto) -> list[str]:
    """What a node reads, with what the subgraphs of its attributes (an If's branches) read from outside."""
    names = list(node.input)
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            names += [i for n in attribute.g.node for i in _inputs(n)]
    return names
