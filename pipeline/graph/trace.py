"""The portable graph from torch.export (the dynamo-based ONNX exporter), traced without any weights.

The model is built from its config under a fake-tensor mode: its parameters have shapes and no data,
so tracing costs the same at 135M and at 8B. The exporter leaves those parameters out of the graph,
and they come back as placeholders for the checkpoint's tensors (pipeline/graph/lazy.py):

    fake model ─► torch.onnx.export(dynamo=True) ─► parameters as graph inputs, buffers (rotary
    frequencies) from the real model ─► onnxscript's optimizer folds what the code computed ─►
    nodes named after their module, as TorchScript named them (`/model/model/layers.0/mlp/up_proj/MatMul`),
    which the block-quantized, W8A8 and stamping rewrites read

`weights_by_name` (pipeline/graph/stamp.py) then turns the inputs into placeholders.
"""

from __future__ import annotations

import ast
import copy
import logging
import warnings
from collections.abc import Mapping

import onnx
import torch

SCOPES = "pkg.torch.onnx.name_scopes"


def fake_model(config, layers: int | None = None, attention: str = "eager") -> torch.nn.Module:
    """`config`'s model with shapes and no data (`layers`: only the first that many decoder layers)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if layers is not None:
        config.num_hidden_layers = layers
        for key in ("layer_types", "no_rope_layers"):
            if getattr(config, key, None):
                setattr(config, key, list(getattr(config, key))[:layers])
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float32)
    return model.eval()


def export_graph(
    wrapper: torch.nn.Module, contract, opset: int, buffers: Mapping[str, torch.Tensor]
) -> onnx.ModelProto:
    """The ONNX graph of `wrapper` ((input_ids, attention_mask, position_ids, *past) -> (logits, *present), a
    fake model inside) with `contract`'s names and symbolic dims, its parameters graph inputs named as in
    `wrapper.named_parameters()`, its buffers initializers holding `buffers` (name -> real value)."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from torch._subclasses.fake_tensor import FakeTensor

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed", on every export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args, shapes = _example_inputs(contract)
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            optimize=False,  # its constant folding would read the fake parameters
            dynamic_shapes=shapes,
            input_names=[s.name for s in contract.inputs()],
            output_names=[s.name for s in contract.outputs()],
            opset_version=opset,
            verbose=False,
        )
    model = program.model
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if name in buffers:
            value.const_value = ir.tensor(buffers[name].detach().cpu().numpy(), name=name)
        elif isinstance(getattr(value.const_value, "raw", None), FakeTensor):
            graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)
    missing = [n for n, v in graph.initializers.items() if isinstance(getattr(v.const_value, "raw", None), FakeTensor)]
    if missing:
        raise ValueError(f"the exporter kept fake tensors {missing[:3]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnxscript.optimizer.optimize(model)
    proto = ir.serde.serialize_model(model)
    name_by_scope(proto.graph)
    for node in proto.graph.node:  # the exporter's stack traces and FX nodes: megabytes in a 30-layer graph
        del node.metadata_props[:]
    del proto.graph.metadata_props[:]
    del proto.metadata_props[:]
    axes = contract.dynamic_axes()
    for value in [*proto.graph.input, *proto.graph.output]:  # the contract's names, not the exporter's symbols
        for axis, name in axes.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name
    return proto


def name_by_scope(graph: onnx.GraphProto) -> None:
    """Name each node `/<module path>/<op>[_k]` from the module scopes the exporter recorded, TorchScript's
    naming, which the rewrites after the trace read. A node the optimizer made has no scopes: it takes
    those of the node that made its first input (a Split of a packed linear's output is that linear's),
    and one that reads nothing made by a node keeps its name."""
    taken: dict[str, int] = {}
    made_in: dict[str, list[str]] = {}
    for node in graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if SCOPES in props:
            scopes = [s for s in ast.literal_eval(props[SCOPES])[:-1] if s]  # the last is the op's own name
        else:
            scopes = next((made_in[x] for x in node.input if x in made_in), None)
            if scopes is None:
                continue
        made_in.update((o, scopes) for o in node.output)
        parts, parent = [], ""
        for scope in scopes:
            parts.append(scope[len(parent) + 1 :] if parent and scope.startswith(parent + ".") else scope)
            parent = scope
        base = "/" + "/".join(parts + [node.op_type])
        k = taken.get(base, 0)
        taken[base] = k + 1
        node.name = base if k == 0 else f"{base}_{k}"


def _example_inputs(contract, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[tuple, tuple]:
    """Inputs of non-trivial sizes (no dimension may be traced as a constant) and their dynamic shapes, in the
    wrapper's argument structure."""
    kv = (batch, contract.num_kv_heads, past, contract.head_dim)
    args = (
        torch.randint(0, contract.vocab_size, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        *[torch.randn(kv) for _ in contract.past_names()],
    )
    b, s, t, p = (torch.export.Dim(n) for n in ("batch", "sequence", "total", "past"))
    shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in contract.past_names()))
    return args, shapes


def real_buffers(model: torch.nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The computed buffers (rotary frequencies) of a real model, named as the wrapper's trace names them."""
    return {prefix + n: b for n, b in model.named_buffers() if not b.is_meta}
