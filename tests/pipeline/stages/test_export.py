"""Export: the graph follows the I/O contract, matches PyTorch with and without a cache, moves
with its folder, and loads in optimum's ORTModelForCausalLM."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import write_recipe

from pipeline import StageError, run
from pipeline.models import load_torch_model
from runtime import Generator, find_model_folder
from runtime.io_spec import Contract


def test_graph_io_names_and_dims_follow_the_contract(tiny_export):
    contract = Contract.load(tiny_export)
    graph = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == [s.name for s in contract.inputs()]
    assert [o.name for o in graph.output] == [s.name for s in contract.outputs()]
    assert [i.name for i in graph.input][:5] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]


def test_the_fused_graph_computes_its_rotary_tables_and_stores_them_where_it_cannot(tiny_export):
    """cos/sin come from positions times the rotary module's frequencies (2 MB stored at SmolLM2's 8,192 positions,
    64 MB at Llama 3.1's 131,072); frequencies that do not give the module's own tables back leave them stored."""
    from types import SimpleNamespace

    from pipeline.graph import fused

    graph = onnx.load(str(tiny_export / "fused" / "model.onnx"), load_external_data=False).graph
    assert not [t.name for t in graph.initializer if t.name.startswith(("cos_cache", "sin_cache"))]
    made = {o: n.op_type for n in graph.node for o in n.output}
    assert (made["cos_cache"], made["sin_cache"]) == ("Cos", "Sin")

    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    angles = torch.arange(64).float()[:, None] * inv[None]
    tables = (angles.cos().numpy(), angles.sin().numpy())
    model = SimpleNamespace(model=SimpleNamespace(rotary_emb=SimpleNamespace(inv_freq=inv, attention_scaling=1.0)))
    assert fused._computed_tables(fused._Graph(), model, "full_attention", tables, "", "float32") is not None
    model.model.rotary_emb.inv_freq = inv * 1.001  # a module whose frequencies are not what made its tables
    assert fused._computed_tables(fused._Graph(), model, "full_attention", tables, "", "float32") is None


def test_the_graph_carries_no_exporter_debug_data(tiny_export):
    """The exporter records a stack trace and FX node per ONNX node: 3.5 MB of the reference model's INT4
    artifact (98 MB of weights) until they were dropped."""
    model = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False)
    assert not any(n.metadata_props for n in model.graph.node)
    assert not model.graph.metadata_props and not model.metadata_props
    assert (tiny_export / "model.onnx").stat().st_size < 64 * 1024


def test_weights_are_external_with_a_relative_path_and_the_folder_moves(tiny_export, tmp_path):
    graph = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False).graph
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    moved = tmp_path / "moved"
    shutil.copytree(tiny_export, moved)
    gen = Generator(moved, provider="cpu")
    assert gen.generate([[5, 6, 7]], max_new_tokens=3).tokens[0]


def _torch_reference(checkpoint: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("graph", ["portable", "fused"])
def test_prefill_and_cached_decode_match_pytorch(family, graph, tmp_path, eval_text, tiny_llama, tiny_qwen2):
    checkpoint = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    run_dir = run(write_recipe(tmp_path, checkpoint, eval_text, name=family), workdir=tmp_path / "a")
    gen = Generator(find_model_folder(run_dir), provider="cpu", graph=graph)
    assert gen.flavour == graph
    ids = np.random.default_rng(1).integers(0, gen.contract.vocab_size, size=(1, 12)).astype(np.int64)
    ref = _torch_reference(checkpoint, ids)[0]  # [12, V], no cache
    logits, state = gen.prefill([ids[0, :5].tolist()], room=7)
    got = [logits[0]]
    for t in range(5, 12):
        got.append(gen.decode(ids[:, t], state)[0])
    np.testing.assert_allclose(np.stack(got), ref[4:], atol=1e-4)
    np.testing.assert_allclose(gen.logits(ids[0]), ref, atol=1e-4)


def test_unsupported_family_is_a_clear_error(tmp_path, eval_text):
    from conftest import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "gpt2"
    tok = make_tokenizer(folder)
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)
    ).save_pretrained(folder)
    with pytest.raises(StageError, match=r"model family 'gpt2' is not supported for export.*supported: llama"):
        run(write_recipe(tmp_path, folder, eval_text, name="g"), workdir=tmp_path / "a")


@pytest.mark.optimum
def test_optimum_ort_model_loads_and_agrees(tiny_export, ort_causal_lm):
    """Others' runtimes load our artifact: optimum's ORTModelForCausalLM generates the same greedy tokens."""
    model = ort_causal_lm.from_pretrained(tiny_export, use_cache=True, use_io_binding=False)
    ids = [3, 17, 42, 8]
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
    )
    ours = Generator(tiny_export, provider="cpu").generate([ids], 6, ignore_eos=True).tokens[0]
    assert out[0, 4:].tolist() == ours


def test_export_manifest_records_parity_and_contract(tiny_export):
    m = json.loads((tiny_export / "manifest.json").read_text())
    assert m["metrics"]["parity_max_abs_diff"] < 1e-4
    assert m["io_contract"]["flavour"] == "portable" and m["io_contract"]["num_layers"] == 2


def test_float16_fused_graph_with_int4_weights(tmp_path, eval_text, tiny_llama):
    """`dtype: float16` on a quantized model: MatMulNBits and GatherBlockQuantized scales, norms, rotary
    tables (computed in float32, then cast) and the KV cache in float16 (what CUDA's GroupQueryAttention needs), logits float32, within
    half precision of the float32 portable graph; the portable graph itself stays float32."""
    import textwrap

    recipe = tmp_path / "half.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: half
        model: {{source: {tiny_llama}}}
        stages:
          - quantize: {{method: rtn, bits: 4, group_size: 32, lm_head: int4, embedding: int4, provider: cuda}}
          - export: {{dtype: float16}}
        """)
    )
    folder = find_model_folder(run(recipe, workdir=tmp_path / "a"))
    fused, portable = Contract.load(folder / "fused"), Contract.load(folder)
    assert (fused.dtype, portable.dtype) == ("float16", "float32")
    assert fused.kv_bytes_per_token() * 2 == portable.kv_bytes_per_token()
    graph = onnx.load(str(folder / "fused" / "model.onnx"), load_external_data=False).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    floats -= {n for n in floats if n.startswith("/model/rotary_tables.")}  # positions and frequencies stay float32
    assert not floats, f"float32 initializers left in the float16 graph: {sorted(floats)[:3]}"
    casts = {o: n for n in graph.node if n.op_type == "Cast" for o in n.output}
    assert all(casts[t].attribute[0].i == onnx.TensorProto.FLOAT16 for t in ("cos_cache", "sin_cache"))
    assert {n.op_type for n in graph.node} >= {"MatMulNBits", "GatherBlockQuantized", "GroupQueryAttention"}
    half, full = Generator(folder, provider="cpu"), Generator(folder, provider="cpu", graph="portable")
    assert half.flavour == "fused"
    ids = np.random.default_rng(2).integers(0, half.contract.vocab_size, size=10)
    got, ref = half.logits(ids), full.logits(ids)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-2)
    parity = json.loads((folder / "manifest.json").read_text())["parity_by_graph"]
    assert 0 < parity["fused"] < 0.5 and parity["portable"] < 1e-3


def test_a_longrope_model_switches_past_its_original_length_and_is_refused_on_transformers_4(tmp_path, eval_text):
    """Neither transformers' longrope switch is traceable (5 copies into a buffer, 4.x decides in Python): the
    trace gets the same choice as a `where`, and the portable graph agrees with PyTorch on a prompt within the
    original length (16) and one past it. On 4.x the export stops: its generate recomputes the cache with the
    long factors at the crossing, which a KV-cache graph does not, so validate's reference would disagree."""
    import transformers
    from conftest import assert_graphs_match_torch, longrope, make_checkpoint

    model = make_checkpoint(tmp_path / "phi", "phi3", settings=longrope(16))
    recipe = write_recipe(tmp_path, model, eval_text)
    if int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(StageError, match=r"^export: phi3 uses longrope, .* use transformers 5$"):
            run(recipe, workdir=tmp_path / "w")
        return
    folder = find_model_folder(run(recipe, workdir=tmp_path / "w"))
    reference = load_torch_model(model)
    assert_graphs_match_torch(folder, reference, (10, 40), atol=1e-4)
