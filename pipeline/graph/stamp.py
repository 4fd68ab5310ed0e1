"""The portable graph of a deep model from the trace of a three-layer copy: the exporter never sees the model.

The decoder layers run the same code, so the graph of layer 2 of a three-layer trace is the graph of
every layer past it:

    3-layer fake copy ─► trace ─► global + layer 0 + layer 1 + layer 2 (template)
    layer 2's nodes, renamed for layers 3 .. N-1 ─► global head reads layer N-1 ─► every weight a
    placeholder for the checkpoint tensor (and transpose) it is named after

Layer 0 and layer 1 stay as traced: layer 1 is where the template's inputs from a previous layer come
from, and layer 0 holds what the exporter computed once and shared (rotary tables, masks). A layer
that is not a copy of the template (layer 1's graph differs from layer 2's) makes `stamp_layers`
return None, and the caller traces the whole model (fake too: it costs time, not memory).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import onnx

from pipeline.graph.lazy import lazy_tensor

TEMPLATE = 2  # the traced layer copied to layers 3 .. N-1
TRACED_LAYERS = 3
_LAYER = re.compile(r"layers\.(\d+)")


def can_stamp(config) -> bool:
    """Deeper than the trace, and every layer of one kind (no alternating sliding-window layers, no layers
    without rotary among layers with it)."""
    layers = config.num_hidden_layers
    kinds = set(
        zip(
            getattr(config, "layer_types", None) or [None] * layers,
            getattr(config, "no_rope_layers", None) or [1] * layers,
        )
    )
    return layers > TRACED_LAYERS and len(kinds) == 1


def stamp_layers(
    traced: onnx.ModelProto, sources: dict[str, tuple[str, bool]], layers: int, log: Callable[[str], None]
) -> onnx.ModelProto | None:
    """`traced` (a three-layer trace, see module docstring) grown to `layers` layers, in place; `sources` is
    what `weights_by_name` found (initializer -> (checkpoint tensor, transposed)). None when the trace does
    not have the shape this needs."""
    graph = traced.graph
    by_layer = _layers_alike(graph, sources, log)
    if by_layer is None:
        return None
    produced = {o: k for k, nodes in by_layer.items() for n in nodes for o in n.output}
    # layer 1's tensors -> the template's tensors made by the same node (what layer i-1 made for layer i)
    counterpart = {a: b for n1, n2 in zip(by_layer[1], by_layer[TEMPLATE]) for a, b in zip(n1.output, n2.output)}
    clones: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for i in range(TRACED_LAYERS, layers):
        for node in by_layer[TEMPLATE]:
            clone = copy.deepcopy(node)
            clone.name = _rename(node.name, i)
            for k, name in enumerate(node.input):
                clone.input[k] = _input_for(name, i, produced, counterpart, sources)
            for k, name in enumerate(node.output):
                clone.output[k] = _rename(name, i)
            clones.append(clone)
        for t in graph.initializer:
            if t.name in sources and _layer_of(sources[t.name][0]) == TEMPLATE:
                param, transpose = sources[t.name]
                new_inits.append(lazy_tensor(_rename(t.name, i), [(_rename_param(param, i), transpose)], list(t.dims)))
    last = layers - 1
    for node in graph.node:  # what read the template's output (the final norm) reads the last layer's now
        if _LAYER.search(node.name) is None:
            for k, name in enumerate(node.input):
                if produced.get(name) == TEMPLATE and last > TEMPLATE:
                    node.input[k] = _rename(name, last)
    position = max(k for k, n in enumerate(graph.node) if _LAYER.search(n.name)) + 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:position] + clones + nodes[position:])
    graph.initializer.extend(new_inits)
    _grow_io(graph, layers)
    del graph.value_info[:]  # shapes of the copy's intermediate tensors; ONNX Runtime infers its own
    log(
        f"  layer stamping: traced {TRACED_LAYERS} layers, layers {TRACED_LAYERS}..{last} copied from layer {TEMPLATE} "
        f"({len(clones)} nodes)"
    )
    return traced


def _layers_alike(graph: onnx.GraphProto, sources: dict, log: Callable[[str], None]) -> dict[int, list] | None:
    """The trace's nodes by layer, when layer 1's graph is the template's with its index changed; else None."""
    by_layer: dict[int, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if (m := _LAYER.search(node.name)) is not None:
            by_layer.setdefault(int(m.group(1)), []).append(node)
    if sorted(by_layer) != list(range(TRACED_LAYERS)):
        log("  layer stamping: the trace's nodes are not named by layer; tracing the whole model")
        return None
    produced = {o: k for k, nodes in by_layer.items() for n in nodes for o in n.output}
    places = {
        o: (_LAYER.sub("layers.N", n.name), list(n.output).index(o))
        for nodes in by_layer.values()
        for n in nodes
        for o in n.output
    }
    shared = {x for n in by_layer[TEMPLATE] for x in n.input if produced.get(x) == 0}  # layer 0 computed them for all
    constants = _constants(graph, sources)
    signatures = [_signature(by_layer[k], k, produced, constants, shared, places) for k in (1, TEMPLATE)]
    if signatures[0] != signatures[1]:
        log("  layer stamping: the decoder layers' graphs differ; tracing the whole model")
        return None
    return by_layer


def weights_by_name(traced: onnx.ModelProto, weights, prefix: str = "model.") -> dict[str, tuple[str, bool]] | None:
    """For a graph traced without its parameters (they are graph inputs named `prefix` + parameter): turn each
    into a placeholder for its checkpoint tensor, in place, and fold each Transpose of one (a linear's
    weight as its MatMul reads it) into a placeholder of the transposed tensor. Returns initializer ->
    (checkpoint tensor, transposed); None when an input names no checkpoint tensor or a shape disagrees."""
    graph = traced.graph
    sources: dict[str, tuple[str, bool]] = {}
    kept = []
    for value in graph.input:
        if not value.name.startswith(prefix):
            kept.append(value)
            continue
        param = value.name[len(prefix) :]
        if param not in weights and param == "lm_head.weight":  # a tied head is the embedding
            param = "model.embed_tokens.weight"
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if param not in weights or list(weights.shape(param)) != dims:
            return None
        sources[value.name] = (param, False)
        graph.initializer.append(lazy_tensor(value.name, [(param, False)], dims))
    if any(not v.name.startswith(("input_ids", "attention_mask", "position_ids", "past_key_values.")) for v in kept):
        return None
    del graph.input[:]
    graph.input.extend(kept)
    transposed: dict[str, str] = {}  # a Transpose's output -> the placeholder that replaces it
    for node in list(graph.node):
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if node.op_type != "Transpose" or node.input[0] not in sources or perm != [1, 0]:
            continue
        param = sources[node.input[0]][0]
        name = f"{node.input[0]}.T"
        if name not in sources:
            sources[name] = (param, True)
            graph.initializer.append(lazy_tensor(name, [(param, True)], list(weights.shape(param))[::-1]))
        transposed[node.output[0]] = name
        graph.node.remove(node)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in transposed:
                node.input[k] = transposed[name]
    used = {x for n in graph.node for x in n.input}
    for t in [t for t in graph.initializer if t.name in sources and t.name not in used]:
        graph.initializer.remove(t)
        del sources[t.name]
    return sources


def _input_for(name: str, i: int, produced: dict, counterpart: dict, sources: dict) -> str:
    """What a copy of a template node for layer `i` reads in place of the template's input `name`."""
    if not name:
        return name
    if name.startswith("past_key_values."):
        return _rename(name, i)
    layer = produced.get(name)
    if layer == TEMPLATE:
        return _rename(name, i)
    if layer == 1:  # made by the previous layer: layer i-1's copy of the template's tensor
        return _rename(counterpart[name], i - 1) if i - 1 > TEMPLATE else counterpart[name]
    if name in sources and _layer_of(sources[name][0]) == TEMPLATE:
        return _rename(name, i)
    return name  # global, layer 0's shared tensors, constants of the code


def _rename(name: str, new: int) -> str:
    """The template's (layer 2's) tensor or node `name` for layer `new`."""
    kv = re.sub(rf"^(present|past_key_values)\.{TEMPLATE}\.", rf"\g<1>.{new}.", name)
    if kv != name:
        return kv
    if f"layers.{TEMPLATE}." in name or f"layers.{TEMPLATE}/" in name:
        return name.replace(f"layers.{TEMPLATE}.", f"layers.{new}.").replace(f"layers.{TEMPLATE}/", f"layers.{new}/")
    return f"{name}__layers.{new}"


def _rename_param(param: str, new: int) -> str:
    return param.replace(f"layers.{TEMPLATE}.", f"layers.{new}.")


def _layer_of(param: str) -> int | None:
    m = _LAYER.search(param)
    return int(m.group(1)) if m else None


def _constants(graph: onnx.GraphProto, sources: dict) -> dict[str, bytes]:
    """The value of every constant tensor the code made (Constant nodes, initializers that are not weights)."""
    out = {t.name: t.SerializeToString() for t in graph.initializer if t.name not in sources}
    for n in graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = b"".join(a.SerializeToString() for a in n.attribute)
    return out


def _signature(
    nodes: list[onnx.NodeProto],
    layer: int,
    produced: dict,
    constants: dict,
    shared: set[str],
    places: dict[str, tuple[str, int]],
) -> list[tuple]:
    """A layer's graph with its own index taken out: op, attributes, and for each input where it comes from
    (this layer's node k, the previous layer's node of that name, a tensor layer 0 computed for all layers, a constant's
    value, a weight, a graph input). Equal for two layers that are copies of each other."""
    index = {o: k for k, n in enumerate(nodes) for o in n.output}

    def source(name: str):
        if name in index:
            return ("own", index[name], list(nodes[index[name]].output).index(name))
        if name in shared:
            return ("shared", name)
        if produced.get(name) == layer - 1:
            return ("previous", *places[name])
        if name in constants:
            return ("const", constants[name])
        if name.startswith("past_key_values."):
            return ("past", name.split(".")[-1])
        return ("other", produced.get(name))  # a weight (checked apart) or a global tensor

    return [(n.op_type, str(n.attribute), tuple(source(x) for x in n.input)) for n in nodes]


def _grow_io(graph: onnx.GraphProto, layers: int) -> None:
    """Inputs past_key_values.{i}.* and outputs present.{i}.* for the stamped layers, after the template's."""
    for values, prefix in ((graph.input, "past_key_values"), (graph.output, "present")):
        template = [copy.deepcopy(v) for v in values if v.name.startswith(f"{prefix}.{TEMPLATE}.")]
        for i in range(TRACED_LAYERS, layers):
            for v in template:
                added = values.add()
                added.CopyFrom(v)
                added.name = _rename(v.name, i)
