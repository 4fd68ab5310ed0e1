"""The fused graph for ONNX Runtime, built node by node from the PyTorch model's weights.

Per decoder layer (Llama family):

    residual ─► SkipSimplifiedLayerNorm ─► q/k/v MatMul ─► GroupQueryAttention ─► o MatMul ─┐
                (adds the previous output)              (rotary inside; past and present    │
                                                         share one preallocated buffer)     │
    residual ◄──────────────────────────────────────────────────────────────────────────────┘
             ─► SkipSimplifiedLayerNorm ─► gate/up MatMul ─► SiLU·up ─► down MatMul ─► next layer

Other families differ in a few places that pipeline/archs.py names: q/k norms (per head in Qwen3, across
heads in OLMo 2), norms on each block's output instead of its input (OLMo 2: residual + norm(block(residual))),
Granite's multipliers on the embeddings, the attention scores, each block's output and the logits, and
SmolLM3's layers without rotary embeddings, and Phi-3's packed q/k/v and gate/up linears.

Linear layers are plain MatMuls named after their modules (`/model/model/layers.0/mlp/up_proj/MatMul`),
so the quantized artifact's codes go in through the same MatMulNBits rewrite as the portable graph.
Prompts are right-padded and `seqlens_k` says how many tokens each sequence holds after the step,
so a batch of ragged prompts runs in one call. The graph uses GroupQueryAttention's inputs as
ONNX Runtime has had them since 1.19 (no `query_seqlens`), so onnxruntime-gpu releases that lag the
CPU package load it too. `logits_positions` picks the rows that reach the LM head, so a prefill pays
for one row of logits per sequence instead of the whole prompt.

With `dtype: float16` (what the CUDA provider's GroupQueryAttention needs) every float weight, the
rotary tables and the KV cache are float16; the logits are cast back to float32 for sampling and
perplexity. The graph is built in float32 first so the quantized-op rewrite and packing see the
weights exactly as PyTorch holds them; `to_float16` converts it last.

With `kv_cache: int8` in the contract, each GroupQueryAttention keeps its cache in int8 and takes the
layer's per-channel key and value scales (pipeline.quant.kv_int8) as initializers.
"""

from __future__ import annotations

import inspect

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.archs import (
    arch_for,
    attention_scale,
    layer_kinds,
    longrope_switch,
    model_dims,
    multiplier,
    softcap,
    uses_rotary,
)
from pipeline.checkpoint import FloatWeights
from pipeline.errors import StageError
from pipeline.graph.lazy import is_lazy, lazy_tensor
from runtime.io_spec import Contract

MS = "com.microsoft"
DTYPES = {
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int8": TensorProto.INT8,
}


class _Graph:
    """Nodes and initializers in the order they are added, written straight into the model proto: each
    weight is held once (building a list and handing it to make_graph and make_model copies every
    weight twice more, 3x the model's size at the peak)."""

    def __init__(self):
        self.model = onnx.ModelProto()
        self.graph = self.model.graph

    def const(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, param: str, shape: list[int], transpose: bool = False) -> str:
        """A checkpoint tensor, left in the checkpoint until the graph is saved (pipeline/graph/lazy.py)."""
        self.graph.initializer.add().CopyFrom(
            lazy_tensor(name, [(param, transpose)], shape[::-1] if transpose else shape)
        )
        return name

    def op(
        self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs
    ) -> list[str]:
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.graph.node.add().CopyFrom(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs


def build_fused_graph(
    model: torch.nn.Module,
    weights: FloatWeights,
    contract: Contract,
    opset: int,
    kv_scales: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """The model as GroupQueryAttention + SimplifiedLayerNormalization + MatMul ops, with float32 weights
    read from `weights` (the checkpoint) when the graph is saved; `model` gives the config and rotary
    tables only (a streamed model will do). Call `to_float16` after any rewrite when the contract's dtype
    is float16. `kv_scales`, per layer (key, value) [1, kv_heads, 1, head_dim], is required when the
    contract's cache is int8."""
    cfg = model.config
    dims = model_dims(cfg)
    spec = arch_for(cfg)
    heads, kv_heads, head_dim = cfg.num_attention_heads, dims.num_kv_heads, dims.head_dim
    _check_supported(cfg, head_dim)
    if (contract.kv_cache == "int8") != (kv_scales is not None):
        raise StageError(
            "export.fused: an int8 KV cache needs its calibrated scales, and only an int8 cache takes them"
        )
    eps = float(cfg.rms_norm_eps)
    g = _Graph()

    def param(name: str, transpose: bool = False) -> str:
        return g.weight(f"{name}.T" if transpose else name, name, weights.shape(name), transpose)

    def linear(x: str, module: str) -> str:
        w = param(f"{module}.weight", transpose=True)
        y = g.op("MatMul", [x, w], f"/model/{module.replace('.', '/')}/MatMul")[0]
        if f"{module}.bias" in weights:
            y = g.op("Add", [y, param(f"{module}.bias")], f"/model/{module.replace('.', '/')}/Add")[0]
        return y

    def rms_norm(x: str, gamma: str, name: str) -> str:
        return g.op("SimplifiedLayerNormalization", [x, gamma], name, axis=-1, epsilon=eps)[0]

    def norm_weight(module: str) -> str:
        """A norm's gain: its weight, plus the family's offset (Gemma's 1 + weight; ONNX Runtime folds the Add)."""
        gamma = param(f"{module}.weight")
        if not spec.norm_offset:
            return gamma
        offset = g.const(f"{module}.offset", np.array(spec.norm_offset, np.float32))
        return g.op("Add", [gamma, offset], f"/model/{module.replace('.', '/')}/offset/Add")[0]

    def scaled(x: str, field: str, path: str) -> str:
        """x times the family's multiplier `field` (archs.ArchSpec), or x where it has none."""
        factor = multiplier(cfg, spec, field)
        if factor is None:
            return x
        return g.op("Mul", [x, g.const(f"{path}.{field}", np.array(factor, np.float32))], f"{path}/Mul")[0]

    def qk_norm(x: str, module: str, n_heads: int) -> str:
        """RMSNorm on q or k before rotary: per head (Qwen3) or across the heads (OLMo 2)."""
        path = f"/model/{module.replace('.', '/')}"
        if spec.qk_norm == "full":
            return rms_norm(x, norm_weight(module), f"{path}/SimplifiedLayerNorm")
        split = g.op(
            "Reshape",
            [x, g.const(f"{module}.heads_shape", np.array([0, 0, n_heads, head_dim], np.int64))],
            f"{path}/Reshape",
        )[0]
        normed = rms_norm(split, norm_weight(module), f"{path}/SimplifiedLayerNorm")
        return g.op(
            "Reshape", [normed, g.const(f"{module}.flat_shape", np.array([0, 0, -1], np.int64))], f"{path}/Reshape_1"
        )[0]

    kinds = layer_kinds(cfg)
    tables = {}  # layer kind -> (cos, sin) names; one pair unless the kinds' rotary bases differ
    made: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # those names -> the tables they hold
    switch = longrope_switch(cfg)
    for kind in dict.fromkeys(kinds):
        full, short = (rotary_tables(model, kind), None) if switch is None else longrope_tables(model, kind, switch)
        cos, sin = _half_width(full)
        if cos.shape[1] % 8 or cos.shape[1] > head_dim // 2:
            raise StageError(
                f"export.fused: rotary on {2 * cos.shape[1]} of each head's {head_dim} dimensions; "
                "GroupQueryAttention needs a multiple of 16 up to the whole head; set fused: false"
            )
        same = next((names for names, held in made.items() if _equal_pair(held, (cos, sin))), None)
        suffix = "" if not tables else f"_{kind}"
        if same:
            tables[kind] = same
        elif short is None:
            computed = _computed_tables(g, model, kind, (cos, sin), suffix, contract.dtype)
            tables[kind] = computed or (g.const(f"cos_cache{suffix}", cos), g.const(f"sin_cache{suffix}", sin))
        else:  # GroupQueryAttention wants every row, which longrope_tables gives the short tables too
            tables[kind] = _switched_tables(g, (cos, sin), _half_width(short), switch, suffix)
        made[tables[kind]] = (cos, sin)
    window = int(getattr(cfg, "sliding_window", None) or -1)
    hidden = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/model/embed_tokens/Gather")[0]
    param("model.embed_tokens.weight")
    hidden = scaled(hidden, "embedding_multiplier", "/model/model/embed_tokens")
    if spec.embedding_sqrt_scale:
        root = g.const("/model/model/embed_tokens.sqrt_hidden", np.array(cfg.hidden_size**0.5, np.float32))
        hidden = g.op("Mul", [hidden, root], "/model/model/embed_tokens/Mul")[0]
    scores_scale = attention_scale(cfg, spec, head_dim)
    scores_cap = softcap(cfg, spec, "attention_softcap")
    mlp_norm = "pre_feedforward_layernorm" if spec.norms == "both" else "post_attention_layernorm"
    residual, pending = hidden, None  # `pending` is the last block's output, added to the residual by the next norm
    for i in range(dims.num_layers):
        p = f"model.layers.{i}"

        def block_input(name: str) -> str:
            """What a block reads: the residual stream, normalized by `name` unless the family norms only outputs."""
            return residual if spec.norms == "post" else norm(name)

        def block_output(y: str, name: str, block: str) -> None:
            """A block's output into the residual stream: pending for the next norm (pre-norm), or normalized by
            `name` and added now (post-norm)."""
            nonlocal residual, pending
            y = scaled(y, "residual_multiplier", f"/model/{p.replace('.', '/')}/{block}/residual")
            if spec.norms == "pre":
                pending = y
                return
            path = f"/model/{p.replace('.', '/')}/{name}"
            normed = rms_norm(y, norm_weight(f"{p}.{name}"), f"{path}/LayerNorm")
            if spec.norms == "both":  # the next norm adds it, as a pre-norm family's does
                pending = normed
                return
            residual = g.op("Add", [residual, normed], f"{path}/Add")[0]

        def norm(name: str) -> str:
            nonlocal residual
            gamma = norm_weight(f"{p}.{name}")
            if pending is None:
                return rms_norm(residual, gamma, f"/model/{p.replace('.', '/')}/{name}/LayerNorm")
            out, _, _, residual = g.op(
                "SkipSimplifiedLayerNormalization",
                [pending, residual, gamma],
                f"/model/{p.replace('.', '/')}/{name}/SkipLayerNorm",
                outputs=4,
                domain=MS,
                epsilon=eps,
            )
            return out

        x = block_input("input_layernorm")
        if spec.packed:  # GroupQueryAttention takes q, k and v packed in its query input
            q, k, v = linear(x, f"{p}.self_attn.qkv_proj"), "", ""
        else:
            q, k, v = (linear(x, f"{p}.self_attn.{n}_proj") for n in "qkv")
        if spec.qk_norm != "none":
            q, k = qk_norm(q, f"{p}.self_attn.q_norm", heads), qk_norm(k, f"{p}.self_attn.k_norm", kv_heads)
        inputs = [
            q,
            k,
            v,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            "seqlens_k",
            "total_sequence_length",
            *tables[kinds[i]],
        ]
        quant = {}
        if kv_scales is not None:  # inputs 9-11 (position_ids, attention_bias, head_sink) stay empty
            inputs += [
                "",
                "",
                "",
                g.const(f"{p}.self_attn.k_scale", kv_scales[i][0]),
                g.const(f"{p}.self_attn.v_scale", kv_scales[i][1]),
            ]
            quant = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        attn, _, _ = g.op(
            "GroupQueryAttention",
            inputs,
            f"/model/{p.replace('.', '/')}/self_attn/GroupQueryAttention",
            outputs=[f"{p}.attn_out", f"present.{i}.key", f"present.{i}.value"],
            domain=MS,
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=int(uses_rotary(cfg, spec, i)),
            rotary_interleaved=0,
            local_window_size=window if kinds[i] == "sliding_attention" else -1,
            scale=float(scores_scale),
            **({"softcap": scores_cap} if scores_cap else {}),
            **quant,
        )
        block_output(linear(attn, f"{p}.self_attn.o_proj"), "post_attention_layernorm", "self_attn")
        x = block_input(mlp_norm)
        path = f"/model/{p.replace('.', '/')}/mlp"
        if spec.packed:
            halves = g.const(f"{p}.mlp.halves", np.array([cfg.intermediate_size] * 2, np.int64))
            gate, up = g.op("Split", [linear(x, f"{p}.mlp.gate_up_proj"), halves], f"{path}/Split", outputs=2, axis=-1)
        else:
            gate, up = linear(x, f"{p}.mlp.gate_proj"), linear(x, f"{p}.mlp.up_proj")
        if activation(cfg) == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{path}/act_fn/Sigmoid")[0]], f"{path}/act_fn/Mul")[0]
        else:  # GELU's tanh approximation, which is what FastGelu computes
            act = g.op("FastGelu", [gate], f"{path}/act_fn/FastGelu", domain=MS)[0]
        block_output(
            linear(g.op("Mul", [act, up], f"{path}/Mul")[0], f"{p}.mlp.down_proj"), "post_feedforward_layernorm", "mlp"
        )
    final = norm_weight("model.norm")
    if spec.norms != "post":
        x = g.op(
            "SkipSimplifiedLayerNormalization",
            [pending, residual, final],
            "/model/model/norm/SkipLayerNorm",
            outputs=1,
            domain=MS,
            epsilon=eps,
        )[0]
    else:
        x = rms_norm(residual, final, "/model/model/norm/LayerNorm")
    # only the rows asked for reach the LM head: a prefill needs one row per sequence, not the whole prompt
    rows = g.op(
        "Unsqueeze",
        ["logits_positions", g.const("last_axis", np.array([-1], np.int64))],
        "/model/logits_rows/Unsqueeze",
    )[0]
    x = g.op("GatherND", [x, rows], "/model/logits_rows/GatherND", batch_dims=1)[0]
    head = "lm_head" if "lm_head.weight" in weights else "model.embed_tokens"
    head_t = g.weight("lm_head.weight.T", f"{head}.weight", weights.shape(f"{head}.weight"), transpose=True)
    divisor = multiplier(cfg, spec, "logits_divisor")
    x = g.op("MatMul", [x, head_t], "/model/lm_head/MatMul")[0]
    if divisor is not None:
        x = g.op(
            "Div", [x, g.const("/model/lm_head.logits_divisor", np.array(divisor, np.float32))], "/model/lm_head/Div"
        )[0]
    if (cap := softcap(cfg, spec, "logits_softcap")) is not None:
        c = g.const("/model/lm_head.softcap", np.array(cap, np.float32))
        x = g.op("Div", [x, c], "/model/lm_head/softcap/Div")[0]
        x = g.op("Mul", [g.op("Tanh", [x], "/model/lm_head/softcap/Tanh")[0], c], "/model/lm_head/softcap/Mul")[0]
    if contract.dtype == "float32":
        _rename_output(g.graph, x, "logits")
    else:
        g.op("Cast", [x], "/model/logits/Cast", outputs=["logits"], to=TensorProto.FLOAT)

    g.graph.name = "fused"
    g.graph.input.extend(_value_infos(contract.inputs()))
    g.graph.output.extend(_value_infos(contract.outputs()))
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    g.model.opset_import.extend(opsets)
    g.model.producer_name = "llm-optimize"
    # the lowest IR version the opset allows, not the installed onnx's newest: older runtimes
    # (onnxruntime-gpu releases lag the CPU package) refuse an IR version newer than they know
    g.model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    return g.model


def to_float16(model: onnx.ModelProto) -> int:
    """Convert every float32 initializer (weights, norms, stored rotary tables, MatMulNBits scales) to float16
    in place; returns how many. The graph's inputs and outputs already carry the contract's types."""
    converted = 0
    for tensor in model.graph.initializer:
        if tensor.name.startswith(ROTARY):  # positions and frequencies: the tables are cast after they are computed
            continue
        if tensor.data_type == TensorProto.FLOAT and is_lazy(tensor):  # converted (and range-checked) as it is saved
            tensor.data_type = TensorProto.FLOAT16
            converted += 1
        elif tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor)
            if np.abs(array).max(initial=0) > np.finfo(np.float16).max:
                raise StageError(f"export: {tensor.name} holds values beyond float16's range; use dtype: float32")
            tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float16), tensor.name))
            converted += 1
    for node in model.graph.node:  # longrope's switch hands the tables on through its branches' outputs
        for branch in (a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
            for value in branch.output:
                if value.type.tensor_type.elem_type == TensorProto.FLOAT:
                    value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return converted


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SiLU; GELU's tanh approximation (Gemma)


def activation(cfg) -> str:
    """The MLP's activation: Gemma 2 and 3 name it `hidden_activation`, the others `hidden_act`."""
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")


def _check_supported(cfg, head_dim: int) -> None:
    if activation(cfg) not in ACTIVATIONS:
        raise StageError(
            f"export.fused: activation {activation(cfg)} is not supported ({', '.join(ACTIVATIONS)}); set fused: false"
        )
    if getattr(cfg, "attention_bias", False) and cfg.model_type != "qwen2":
        raise StageError("export.fused: attention biases are only supported for qwen2; set fused: false")
    if getattr(cfg, "mlp_bias", False):
        raise StageError("export.fused: MLP biases are not supported; set fused: false")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if any(isinstance(r, dict) and r.get("rope_type") == "longrope" for r in rope.values()):
        raise StageError("export.fused: longrope on some layer kinds only is not supported; set fused: false")
    if head_dim % 16:
        raise StageError(f"export.fused: head_dim {head_dim} is not a multiple of 16, which GroupQueryAttention needs")


def rotary_tables(model, kind: str, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, rotary_dim] (length: max_positions) from the model's own rotary module (any rope scaling)
    for layers of `kind`, as it computes them for a sequence of that length (longrope's factors depend on it);
    rotary_dim is head_dim except under partial rotary (Phi-4-mini). Gemma 3's sliding layers have a base of their
    own: transformers 5 takes the layer kind, 4.x keeps a second module."""
    positions = torch.arange(length or model.config.max_position_embeddings)[None]
    rotary, x = model.model.rotary_emb, torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            cos, sin = rotary(x, positions, kind)
        elif kind == "sliding_attention" and hasattr(model.model, "rotary_emb_local"):
            cos, sin = model.model.rotary_emb_local(x, positions)
        else:
            cos, sin = rotary(x, positions)
    return cos[0], sin[0]


def longrope_tables(model, kind: str, switch: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Longrope's (long, short) cos/sin tables over every position, as the rotary module computes them for a
    sequence past `switch` tokens and for one within it. The short tables' rows past `switch` are never read (a
    sequence that long takes the long tables), so they are zero."""
    long = rotary_tables(model, kind)
    short = tuple(
        torch.cat([t, t.new_zeros(len(lt) - switch, t.shape[-1])])
        for t, lt in zip(rotary_tables(model, kind, switch), long)
    )
    return long, short


def _half_width(tables: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
    """The first half of each table's columns, what GroupQueryAttention reads (its rotary_dim from their width)."""
    return tuple(t[:, : t.shape[-1] // 2].numpy().astype(np.float32) for t in tables)


def _switched_tables(
    g: _Graph, long: tuple[np.ndarray, np.ndarray], short: tuple[np.ndarray, np.ndarray], switch: int, suffix: str
) -> tuple[str, str]:
    """cos/sin that are longrope's long tables once the longest sequence in the batch holds more than `switch`
    tokens, else its short ones, as transformers picks them from the largest position in the call. Keys are
    rotated as they enter the cache, so those cached under the short tables stay so, as in transformers."""
    names = (f"cos_cache{suffix}", f"sin_cache{suffix}")
    for tables, which in ((long, "long"), (short, "short")):
        for name, table in zip(names, tables):
            g.const(f"{name}_{which}", table)
    longest = g.op("ReduceMax", ["seqlens_k"], f"/model/rotary{suffix}/ReduceMax", keepdims=0)[0]
    last = g.const(f"/model/rotary{suffix}.short_positions", np.array(switch - 1, np.int32))
    is_long = g.op("Greater", [longest, last], f"/model/rotary{suffix}/Greater")[0]
    half = long[0].shape[1]

    def branch(which: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Identity", [f"{n}_{which}"], [f"{n}_{which}_out"]) for n in names]
        outs = [helper.make_tensor_value_info(f"{n}_{which}_out", TensorProto.FLOAT, [None, half]) for n in names]
        return helper.make_graph(nodes, which, [], outs)

    g.op(
        "If",
        [is_long],
        f"/model/rotary{suffix}/If",
        list(names),
        then_branch=branch("long"),
        else_branch=branch("short"),
    )
    return names


def _equal_pair(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


ROTARY = "/model/rotary_tables"  # the float32 constants the tables are computed from: never converted to float16


def _computed_tables(
    g: _Graph, model, kind: str, tables: tuple[np.ndarray, np.ndarray], suffix: str, dtype: str
) -> tuple[str, str] | None:
    """cos/sin computed in the graph as the rotary module computes them, cos(position · inv_freq) · scaling in
    float32, instead of stored: at 8,192 positions they are 2 MB of the file, at Llama 3.1's 131,072 positions
    64 MB. ONNX Runtime folds them into constants when the session loads (its Cos and Sin agree with torch's to
    1.2e-7 at 131,072). None, and the tables are stored, unless the module's frequencies give its own tables back
    (to 1e-6), whatever its rope type."""
    inv, scaling = _rotary_frequencies(model, kind)
    if inv is None or inv.shape != (tables[0].shape[1],):
        return None
    angles = torch.arange(len(tables[0]), dtype=torch.float32)[:, None] * torch.from_numpy(inv)[None]
    remade = ((angles.cos() * scaling).numpy(), (angles.sin() * scaling).numpy())
    if not all(np.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(remade, tables)):
        return None
    path = f"{ROTARY}{suffix}"

    def f32(name: str, value) -> str:  # scalars stay 0-d, which Range requires (g.const makes them 1-d)
        g.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.array(value, np.float32), f"{path}.{name}"))
        return f"{path}.{name}"

    positions = g.op("Range", [f32("start", 0), f32("limit", len(tables[0])), f32("delta", 1)], f"{path}/Range")[0]
    column = g.op("Unsqueeze", [positions, g.const(f"{path}.axis", np.array([1], np.int64))], f"{path}/Unsqueeze")[0]
    angle = g.op("Mul", [column, f32("inv_freq", inv)], f"{path}/Mul")[0]
    names = (f"cos_cache{suffix}", f"sin_cache{suffix}")
    for op, name in zip(("Cos", "Sin"), names):
        x = g.op(op, [angle], f"{path}/{op}")[0]
        if scaling != 1.0:
            x = g.op("Mul", [x, f32("scaling", scaling)], f"{path}/{op}_Mul")[0]
        if dtype != "float32":
            x = g.op("Cast", [x], f"{path}/{op}_Cast", to=DTYPES[dtype])[0]
        _rename_output(g.graph, x, name)
    return names


def _rotary_frequencies(model, kind: str) -> tuple[np.ndarray | None, float]:
    """The inverse frequencies and output scaling of the rotary module for layers of `kind` (transformers 5
    keeps one set per kind on one module, 4.x a second module for Gemma 3's sliding layers)."""
    rotary = model.model.rotary_emb
    if kind == "sliding_attention" and hasattr(model.model, "rotary_emb_local"):
        rotary = model.model.rotary_emb_local
    inv = getattr(rotary, f"{kind}_inv_freq", None)
    inv = getattr(rotary, "inv_freq", None) if inv is None else inv
    scaling = getattr(rotary, f"{kind}_attention_scaling", getattr(rotary, "attention_scaling", 1.0))
    if not isinstance(inv, torch.Tensor):
        return None, 1.0
    return inv.detach().float().numpy(), float(scaling)


def _rename_output(graph: onnx.GraphProto, name: str, new: str) -> None:
    """The graph's last node writes `new` instead of `name` (a graph output's name)."""
    assert graph.node[-1].output[0] == name
    graph.node[-1].output[0] = new


def _value_infos(specs) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(s.name, DTYPES[s.dtype], list(s.dims)) for s in specs]


def float_cache_graph(model: onnx.ModelProto, dtype: str = "float32") -> onnx.ModelProto:
    """The int8-cache graph with a `dtype` cache instead: GroupQueryAttention without its scales and
    quantization attributes, the cache inputs and outputs retyped, every other node and weight as is.
    The runner runs prompts through it (their attention reads the float keys and values they just made,
    where the int8 kernel reads back the codes it wrote, 1.15 to 1.8x slower) and rounds the result into the
    int8 cache itself. Weights stored as external data keep their references, so both graphs share one
    data file."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dropped: set[str] = set()
    for node in out.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 9:
            dropped.update(name for name in node.input[9:] if name)
            del node.input[9:]
            kept = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
            del node.attribute[:]
            node.attribute.extend(kept)
    if not dropped:
        raise StageError("export: the fused graph has no int8 KV cache to take out")
    kept_inits = [t for t in out.graph.initializer if t.name not in dropped]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits)
    for value in list(out.graph.input) + list(out.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = DTYPES[dtype]
    return out
