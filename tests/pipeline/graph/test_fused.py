"""The fused graph (GroupQueryAttention, fused RMSNorms, in-place KV cache) against PyTorch, per family,
for ragged right-padded prompts and a cached decode step, in float32 and float16."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import FAMILY_SETTINGS, longrope

from pipeline.archs import arch_for, model_dims
from pipeline.checkpoint import ModelWeights
from pipeline.graph.fused import build_fused_graph, float_cache_graph, to_float16
from pipeline.graph.lazy import materialize
from pipeline.graph.pack import pack_sibling_matmuls
from pipeline.quant.kv_int8 import RoundingCache, kv_scales
from runtime.io_spec import Contract


def _tiny(family: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {
        "vocab_size": 120,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": family == "qwen2",
    }
    config = AutoConfig.for_model(family, **{**settings, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _session(model, pack: bool = False, dtype: str = "float32", scales: list | None = None):
    d = model_dims(model.config)
    contract = Contract(
        "fused",
        d.num_layers,
        d.num_kv_heads,
        d.head_dim,
        d.vocab_size,
        max_positions=64,
        dtype=dtype,
        kv_cache="int8" if scales else "float",
    )
    graph = build_fused_graph(model, ModelWeights(model), contract, 17, scales)
    if pack:
        matmuls = sum(n.op_type == "MatMul" for n in graph.graph.node)
        groups = pack_sibling_matmuls(graph)
        packed = arch_for(model.config).packed  # Phi-3's checkpoint packs them already
        assert groups == (0 if packed else 2 * d.num_layers)  # q/k/v and gate/up in every layer
        assert sum(n.op_type == "MatMul" for n in graph.graph.node) == matmuls - (0 if packed else 3 * d.num_layers)
    if dtype == "float16":
        assert to_float16(graph) > 0
    materialize(graph, ModelWeights(model))
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]), contract


FAMILIES = [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("mistral", {"sliding_window": 4}),
    ("granite", FAMILY_SETTINGS["granite"]),
    ("olmo2", {}),
    ("smollm3", FAMILY_SETTINGS["smollm3"]),
    ("phi3", FAMILY_SETTINGS["phi3"]),
    ("gemma", FAMILY_SETTINGS["gemma"]),
    ("gemma2", FAMILY_SETTINGS["gemma2"]),
    ("gemma3_text", FAMILY_SETTINGS["gemma3_text"]),
]


@pytest.mark.parametrize("pack", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("family,extra", FAMILIES)
def test_fused_graph_matches_pytorch_for_ragged_prefill_and_decode(family, extra, pack):
    _check_against_pytorch(_tiny(family, **extra), pack, "float32", atol=1e-4)


@pytest.mark.parametrize("family,extra", FAMILIES)
def test_float16_graph_matches_pytorch_within_half_precision(family, extra):
    _check_against_pytorch(_tiny(family, **extra), True, "float16", atol=5e-3)


@pytest.mark.parametrize("family,extra", FAMILIES)
def test_int8_kv_cache_graph_matches_pytorch_rounding_alike(family, extra):
    """With an int8 cache the graph must equal PyTorch attending over keys and values rounded with the same
    per-channel scales (prefill reads the rounded cache too), and differ from the float model."""
    model = _tiny(family, **extra)
    with torch.no_grad():
        scales = kv_scales(model, [torch.randint(0, 120, (2, 32), generator=torch.Generator().manual_seed(1))])
    dims = model_dims(model.config)
    assert len(scales) == 2 and scales[0][0].shape == (1, dims.num_kv_heads, 1, dims.head_dim)
    assert (scales[0][0] > 0).all()
    _check_against_pytorch(model, True, "float32", atol=2e-3, scales=scales)
    with pytest.raises(AssertionError):  # the rounding is real: the float model is farther than the tolerance
        _check_against_pytorch(model, True, "float32", atol=2e-4, scales=scales, rounding_reference=False)


def _check_against_pytorch(
    model, pack: bool, dtype: str, atol: float, scales: list | None = None, rounding_reference: bool = True
):
    """Prefill two ragged right-padded prompts (GroupQueryAttention's first prompt), then decode one
    token for each row: the pad positions the prefill wrote into the shorter row are overwritten.
    With `scales` the cache is int8, and PyTorch rounds its cache alike unless `rounding_reference` is off."""
    session, contract = _session(model, pack, dtype, scales)
    capacity, lengths = 24, np.array([12, 5])
    ids = np.random.default_rng(0).integers(0, 120, (2, 12))
    past = {
        n: np.zeros((2, contract.num_kv_heads, capacity, contract.head_dim), contract.kv_dtype)
        for n in contract.past_names()
    }
    logits, *presents = session.run(
        None,
        {
            "input_ids": ids,
            "seqlens_k": (lengths - 1).astype(np.int32),
            "total_sequence_length": np.array(12, np.int32),
            "logits_positions": np.tile(np.arange(12), (2, 1)),
            **past,
        },
    )
    assert logits.dtype == np.float32 and presents[0].dtype == np.dtype(contract.kv_dtype)

    def reference(x):
        cache = RoundingCache(scales) if scales and rounding_reference else None
        return model(torch.tensor(x), past_key_values=cache, use_cache=cache is not None).logits[0]

    with torch.no_grad():
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(logits[row, :n], reference(ids[row : row + 1, :n]).numpy(), atol=atol)
    logits, *_ = session.run(
        None,
        {
            "input_ids": np.array([[7], [9]]),
            "seqlens_k": lengths.astype(np.int32),
            "total_sequence_length": np.array(capacity, np.int32),
            "logits_positions": np.zeros((2, 1), np.int64),
            **dict(zip(contract.past_names(), presents)),
        },
    )
    with torch.no_grad():
        for row, token in enumerate((7, 9)):
            ref = reference(np.concatenate([ids[row, : lengths[row]], [token]])[None])[-1].numpy()
            np.testing.assert_allclose(logits[row, 0], ref, atol=atol)


def test_the_float_twin_of_an_int8_graph_runs_prompts_whose_codes_decode_like_pytorch():
    """float_cache_graph: the int8 graph without its rounding is the float graph (same logits and cache for a
    prompt). Its keys and values rounded by the runner, then a decode step in the int8 graph, equal PyTorch
    whose prompt attends in float and whose cache is stored rounded (RoundingCache(float_prompt=True))."""
    from runtime.float_prefill import quantize

    model = _tiny("llama")
    with torch.no_grad():
        scales = kv_scales(model, [torch.randint(0, 120, (2, 32), generator=torch.Generator().manual_seed(1))])
    d = model_dims(model.config)
    int8 = Contract("fused", d.num_layers, d.num_kv_heads, d.head_dim, d.vocab_size, max_positions=64, kv_cache="int8")
    int8_graph = build_fused_graph(model, ModelWeights(model), int8, 17, scales)
    twin = float_cache_graph(int8_graph)
    assert not [a for n in twin.graph.node for a in n.attribute if a.name == "kv_cache_bit_width"]
    assert not [t for t in twin.graph.initializer if t.name.endswith("_scale")]
    float_session, contract = _session(model)
    twin_session = ort.InferenceSession(
        materialize(twin, ModelWeights(model)).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    n, capacity = 9, 16
    ids = np.random.default_rng(2).integers(0, 120, (1, n))
    feeds = {
        "input_ids": ids,
        "seqlens_k": np.array([n - 1], np.int32),
        "total_sequence_length": np.array(n, np.int32),
        "logits_positions": np.array([[n - 1]]),
        **{name: np.zeros((1, d.num_kv_heads, n, d.head_dim), np.float32) for name in contract.past_names()},
    }
    got, want = twin_session.run(None, feeds), float_session.run(None, feeds)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6)

    codes = [np.zeros((1, d.num_kv_heads, capacity, d.head_dim), np.int8) for _ in contract.past_names()]
    per_name = [s for pair in scales for s in pair]  # layer 0 key, value, layer 1 key, …
    for code, present, scale in zip(codes, got[1:], per_name):
        code[:, :, :n] = quantize(present, scale)
    int8_session = ort.InferenceSession(
        materialize(int8_graph, ModelWeights(model)).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    step, *_ = int8_session.run(
        None,
        {
            "input_ids": np.array([[7]]),
            "seqlens_k": np.array([n], np.int32),
            "total_sequence_length": np.array(capacity, np.int32),
            "logits_positions": np.zeros((1, 1), np.int64),
            **dict(zip(contract.past_names(), codes)),
        },
    )
    with torch.no_grad():
        cache = RoundingCache(scales, float_prompt=True)
        prompt = model(torch.tensor(ids), past_key_values=cache, use_cache=True).logits[0, -1]
        ref = model(torch.tensor([[7]]), past_key_values=cache, use_cache=True).logits[0, -1]
    np.testing.assert_allclose(got[0][0, 0], prompt.numpy(), atol=1e-4)
    np.testing.assert_allclose(step[0, 0], ref.numpy(), atol=2e-3)


def test_ir_version_is_the_lowest_the_opset_allows():
    """onnxruntime-gpu 1.31 refuses IR 14 (what onnx 1.23 writes by default): the graph must not ask for it."""
    d = model_dims((model := _tiny("llama")).config)
    contract = Contract("fused", d.num_layers, d.num_kv_heads, d.head_dim, d.vocab_size, max_positions=64)
    assert build_fused_graph(model, ModelWeights(model), contract, 17).ir_version == 8
    assert build_fused_graph(model, ModelWeights(model), contract, 21).ir_version == 10


def test_unsupported_activation_is_refused():
    from pipeline.errors import StageError

    model = _tiny("llama", hidden_act="gelu")
    with pytest.raises(StageError, match="activation gelu is not supported"):
        _session(model)


LONGROPE = {**FAMILY_SETTINGS["phi3"], **longrope(16)}


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("float16", 5e-3)])
def test_longrope_takes_its_long_tables_past_the_original_length_as_transformers_does(dtype, atol):
    """Phi-3.5 and Phi-4-mini: prompts within the original length (16 here) rotate by the short factors, longer
    ones by the long factors; decode steps that cross it rotate new keys by the long factors while the keys
    already cached keep the short ones, as transformers' cache does."""
    from transformers.cache_utils import DynamicCache

    model = _tiny("phi3", **LONGROPE)
    session, contract = _session(model, dtype=dtype)
    capacity = 32

    def step(ids: np.ndarray, past: dict | None, length: int) -> tuple[np.ndarray, dict]:
        past = past or {
            n: np.zeros((1, contract.num_kv_heads, capacity, contract.head_dim), contract.kv_dtype)
            for n in contract.past_names()
        }
        logits, *presents = session.run(
            None,
            {
                "input_ids": ids[None],
                "seqlens_k": np.array([length - 1], np.int32),
                "total_sequence_length": np.array(capacity if len(ids) == 1 else length, np.int32),
                "logits_positions": np.arange(len(ids))[None],
                **past,
            },
        )
        return logits[0], dict(zip(contract.past_names(), presents))

    ids = np.random.default_rng(0).integers(0, 120, 24)
    with torch.no_grad():
        for n in (12, 24):  # within and beyond the original length, whole prompts
            np.testing.assert_allclose(
                step(ids[:n], None, n)[0], model(torch.tensor(ids[None, :n])).logits[0], atol=atol
            )
        logits, past = step(ids[:14], None, 14)
        cache = DynamicCache()
        model(torch.tensor(ids[None, :14]), past_key_values=cache, use_cache=True)
        for t in range(14, 20):  # positions 14 .. 19: the sequence outgrows 16 at position 16
            logits, past = step(ids[t : t + 1], past, t + 1)
            ref = model(torch.tensor(ids[None, t : t + 1]), past_key_values=cache, use_cache=True).logits[0]
            np.testing.assert_allclose(logits, ref, atol=atol)
