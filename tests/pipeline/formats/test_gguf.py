"""GGUF export: our codes land in ggml's blocks unchanged, bad pairs are refused up front, and the
validate stage measures the file through llama.cpp (or says it could not)."""

import json
import sys

import gguf
import numpy as np
import pytest
from conftest import write_targets_recipe
from safetensors.numpy import load_file

from pipeline import run
from pipeline.errors import RecipeError, StageError
from pipeline.formats.gguf import (
    _rope_tensors,
    block_values,
    gguf_family,
    permute_rows,
    rope_settings,
    tensor_sources,
)
from pipeline.quant.primitives import unpack_matmul_nbits
from pipeline.recipe import load_recipe

HEADS = {"q_proj": 4, "k_proj": 2}  # the tiny llama's attention and KV heads


def recipe(folder, model, text, quantize, targets="[onnx, gguf]", thresholds="{}"):
    return write_targets_recipe(folder, model, text, quantize, targets, thresholds)


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_llama, eval_text):
    work = tmp_path_factory.mktemp("gguf")
    quantize = "{method: rtn, group_size: 32, overrides: {'mlp\\.down_proj': 8}, lm_head: int4}"
    return run(recipe(work, tiny_llama, eval_text, quantize), workdir=work / "artifacts")


def test_codes_are_copied_into_ggml_blocks_unchanged(gguf_run):
    quant = next(gguf_run.glob("*-quantize-*"))
    plan = json.loads((quant / "quant_plan.json").read_text())["layers"]
    packed = load_file(str(quant / "quantized.safetensors"))
    reader = gguf.GGUFReader(str(next(gguf_run.glob("*-export-*")) / "gguf" / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    checked = 0
    for layer, spec in plan.items():
        if spec["bits"] == 8 and not spec["symmetric"]:
            continue  # no exact ggml block: re-quantized, covered below
        q, scale, zero = unpack_matmul_nbits(packed, layer, spec)
        kind = layer.rsplit(".", 1)[-1]
        if kind in HEADS:
            q, scale, zero = (permute_rows(a, HEADS[kind]) for a in (q, scale, zero))
        name = _gguf_name(layer)
        t = tensors[name]
        assert (
            t.tensor_type.name
            == {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}[spec["bits"], spec["symmetric"]]
        )
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        # ggml's arithmetic on our codes with float16 block scales, to the bit
        np.testing.assert_array_equal(got, block_values(q, scale, zero, t.tensor_type))
        checked += 1
    assert checked >= 10


def test_norms_stay_float32_and_int8_asymmetric_is_reported_as_converted(gguf_run):
    export = next(gguf_run.glob("*-export-*"))
    manifest = json.loads((export / "gguf" / "manifest.json").read_text())
    assert manifest["tensor_types"]["F32"] >= 5  # norms (2 a layer) and the final norm
    assert manifest["converted_layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert manifest["tokenizer"] == "built from tokenizer.json"
    reader = gguf.GGUFReader(str(export / "gguf" / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert "{%" in reader.fields["tokenizer.chat_template"].contents()
    step = json.loads((export / "manifest.json").read_text())
    assert step["targets"]["gguf"]["sha256"] == manifest["sha256"]


def test_the_validate_stage_measures_the_gguf_or_says_why_not(gguf_run):
    report = json.loads(next(gguf_run.glob("*-validate-*/report.json")).read_text())
    entry = report["targets"]["gguf"]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert entry["validated"] is False and "pip install llama-cpp-python" in entry["install"]
    else:
        assert entry["validated"] is True
        assert report["metrics"]["gguf_perplexity_vs_onnx_pct"] < 1.0


def test_a_tied_embedding_is_written_once_only_when_it_shares_the_heads_codes():
    tied = ["model.embed_tokens.weight", "model.norm.weight"]  # a tied checkpoint: no lm_head.weight
    head = {"bits": 4, "group_size": 32, "symmetric": False, "N": 300, "K": 64}
    shared = {"lm_head": head, "model.embed_tokens": {**head, "shared_with": "lm_head"}}
    assert tensor_sources(tied, shared) == [("model.norm.weight", None), ("lm_head.weight", "token_embd.weight")]
    # a float (or separately quantized) embedding stays what it is; the head becomes output.weight
    assert tensor_sources(tied, {"lm_head": head}) == [(n, None) for n in tied] + [("lm_head.weight", None)]
    untied = tied + ["lm_head.weight"]
    assert tensor_sources(untied, {"lm_head": head}) == [(n, None) for n in untied]


def test_bench_runs_llama_cpp_on_the_exports_own_gguf(gguf_run, eval_text, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make engines)")
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(gguf_run),
            "--text",
            str(eval_text),
            "--prompt-lengths",
            "8",
            "--batches",
            "1",
            "--new-tokens",
            "4",
            "--long-tokens",
            "20",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            "--compare",
            "--peers",
            "llama.cpp",
        ],
    )
    assert result.exit_code == 0, result.output
    llama = next(p for p in json.loads((tmp_path / "bench.json").read_text())["results"] if p["engine"] == "llama.cpp")
    assert llama["status"] == "ok" and llama["precision"] == "Q4_1" and llama["decode_tok_s"]["1"] > 0


def test_a_missing_engine_is_never_a_pass(tmp_path, tiny_llama, eval_text, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    path = recipe(
        tmp_path,
        tiny_llama,
        eval_text,
        "{method: rtn, group_size: 32}",
        thresholds="{gguf_perplexity_vs_onnx_pct: 1.0}",
    )
    from pipeline import ValidationFailed

    with pytest.raises(ValidationFailed, match="gguf_perplexity_vs_onnx_pct = None"):
        run(path, workdir=tmp_path / "artifacts")


@pytest.mark.parametrize(
    "quantize, targets, words",
    [
        ("{method: gptq, group_size: 128}", "[onnx, gguf]", "gptq int4 g128"),
        ("{method: w8a8}", "[onnx, gguf]", "W8A8"),
        ("{method: rtn, group_size: 32, lm_head: int4, head_group_size: 16}", "[onnx, gguf]", "groups of 16"),
        ("{method: rtn, group_size: 32}", "[gguf]", "must include onnx"),
        ("{method: rtn, group_size: 32}", "[onnx, ggfu]", "did you mean 'gguf'"),
    ],
)
def test_pairs_gguf_cannot_hold_are_refused_before_any_work(tmp_path, tiny_llama, eval_text, quantize, targets, words):
    with pytest.raises(RecipeError, match="targets") as e:
        load_recipe(recipe(tmp_path, tiny_llama, eval_text, quantize, targets))
    assert words in str(e.value)


def _gguf_name(layer: str) -> str:
    if layer == "lm_head":
        return "output.weight"
    i, kind = layer.split(".")[2], layer.rsplit(".", 1)[-1]
    return {
        "q_proj": f"blk.{i}.attn_q.weight",
        "k_proj": f"blk.{i}.attn_k.weight",
        "v_proj": f"blk.{i}.attn_v.weight",
        "o_proj": f"blk.{i}.attn_output.weight",
        "gate_proj": f"blk.{i}.ffn_gate.weight",
        "up_proj": f"blk.{i}.ffn_up.weight",
        "down_proj": f"blk.{i}.ffn_down.weight",
    }[kind]


def test_the_rotary_base_is_read_from_either_stacks_config():
    """transformers 5 writes rope_theta inside rope_parameters, 4.x at the top level; reading only the latter
    gave llama.cpp a base of 10,000 for SmolLM2's 100,000 (its perplexity 14 % off our runner's)."""
    assert rope_settings({"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}})["theta"] == 100000.0
    assert rope_settings({"rope_theta": 500000.0})["theta"] == 500000.0
    assert rope_settings({})["theta"] == 10000.0


@pytest.mark.parametrize(
    "family, settings, words",
    [
        ("gemma2", {"query_pre_attn_scalar": 24}, "query_pre_attn_scalar 24: llama.cpp scales the scores by head_dim"),
        ("gemma3_text", {"query_pre_attn_scalar": 32}, "a rotary base of 1000.0 on its sliding layers"),
        ("smollm3", {"no_rope_layer_interval": 2}, "rotary-free layers other than every fourth"),
        ("mistral", {"sliding_window": 16}, "a sliding window of 16, which llama.cpp's llama graph does not apply"),
        ("phi3", {"sliding_window": 8}, "a sliding window of 8, which llama.cpp's phi3 graph does not apply"),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn rope scaling"),
        ("cohere", {}, "GGUF export covers llama, mistral, qwen2"),
    ],
)
def test_what_llama_cpp_would_compute_differently_is_refused_by_name(tmp_path, family, settings, words):
    from conftest import make_checkpoint

    config = json.loads((make_checkpoint(tmp_path, family, settings=settings) / "config.json").read_text())
    with pytest.raises(StageError, match="drop gguf from export.targets") as e:
        gguf_family(config, "export.targets gguf")
    assert words in str(e.value)


def test_a_family_llama_cpp_cannot_hold_stops_before_quantizing(tmp_path, eval_text):
    from conftest import make_checkpoint

    model = make_checkpoint(tmp_path / "g", "gemma2", layers=2)  # query_pre_attn_scalar 24, head_dim 32
    with pytest.raises(StageError, match=r"^export.targets gguf: gemma2 with query_pre_attn_scalar 24"):
        run(recipe(tmp_path, model, eval_text, "{method: gptq, group_size: 32}"), workdir=tmp_path / "w")
    assert not list((tmp_path / "w").glob("*/*-quantize-*"))


def test_llama3_rope_factors_are_what_transformers_divides_the_frequencies_by():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config = {"hidden_size": 2048, "num_attention_heads": 32, "rope_theta": 500000.0}
    settings = {**config, "rope_scaling": {**scaling, "original_max_position_embeddings": 8192}}
    hf = LlamaConfig(**settings, max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    divisor = _rope_tensors({**settings, "rope_parameters": None})["rope_freqs.weight"]
    np.testing.assert_allclose(divisor, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert divisor.min() == 1.0 and divisor.max() == 32.0
