"""Each family we export, end to end on a tiny random checkpoint made from its config: INT4 RTN, GPTQ and AWQ,
both graphs within the parity limits, validate against PyTorch, the runner's batch equal to one by one, and the
export targets (GGUF, compressed-tensors, onnxruntime-genai) in their own engines."""

from __future__ import annotations

import json
import textwrap

import gguf
import pytest
from conftest import assert_graphs_match_torch, longrope, make_checkpoint, write_targets_recipe

from pipeline import StageError, run
from pipeline.archs import ARCHS
from pipeline.formats.gguf import FAMILIES as GGUF_FAMILIES
from pipeline.models import load_torch_model
from runtime import Generator, find_model_folder

pytestmark = pytest.mark.slow  # three quantized runs per family, a few seconds each


def _recipe(folder, model, text, quantize: str):
    path = folder / "r.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: family
        model: {{source: {model}}}
        stages:
          - quantize: {quantize}
          - export: {{}}
          - validate:
              eval_data: {{source: {text}}}
              context_length: 64
              max_windows: 3
              max_new_tokens: 8
              prompts: ["The capital of France", "Once upon a time there was a", "def add(a, b):"]
        """)
    )
    return path


QUANTIZE = {
    "rtn": "{method: rtn, bits: 4, group_size: 16}",
    "awq": "{method: awq, bits: 4, group_size: 16, search_tokens: 64, "
    "calibration: {data: {source: %s}, num_samples: 8, sequence_length: 32}}",
    "gptq": "{method: gptq, bits: 4, group_size: 16, calibration: {data: {source: %s}, num_samples: 8, sequence_length: 32}}",
}


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("family", sorted(set(ARCHS) - {"llama"}))  # llama: every other test
def test_a_family_quantizes_exports_validates_and_generates(tmp_path, eval_text, family, method):
    model = make_checkpoint(tmp_path / family, family, layers=4)
    quantize = QUANTIZE[method] % eval_text if "%s" in QUANTIZE[method] else QUANTIZE[method]
    run_dir = run(_recipe(tmp_path, model, eval_text, quantize), workdir=tmp_path / "w")
    export = json.loads((next(run_dir.glob("02-export-*")) / "manifest.json").read_text())
    assert export["metrics"]["parity_max_abs_diff"] < ARCHS[family].atol  # the fused graph against PyTorch
    report = json.loads((next(run_dir.glob("03-validate-*")) / "report.json").read_text())
    assert report["passed"] and report["graph"] == "fused", report["failures"]
    metrics = report["metrics"]
    assert metrics["batch_greedy_agreement"] == 1.0 and metrics["perplexity_delta_pct"] < 15
    generator = Generator(find_model_folder(run_dir))
    prompts = [generator.tokenizer.encode(p) for p in ("Hello there", "The capital of France is")]
    batched = generator.generate(prompts, 6, ignore_eos=True).tokens
    assert batched == [generator.generate([p], 6, ignore_eos=True).tokens[0] for p in prompts]


def test_a_longrope_model_quantizes_exports_validates_and_generates(tmp_path, eval_text):
    """Phi-3.5 / Phi-4-mini's longrope, its original length (32) below the eval windows (64) and above the
    prompts: both graphs within the parity limit, validate against PyTorch, batch equal to one by one."""
    model = make_checkpoint(tmp_path / "phi", "phi3", layers=4, settings=longrope(32))
    run_dir = run(_recipe(tmp_path, model, eval_text, QUANTIZE["rtn"]), workdir=tmp_path / "w")
    export = json.loads((next(run_dir.glob("02-export-*")) / "manifest.json").read_text())
    assert set(export["parity_by_graph"]) == {"portable", "fused"}
    report = json.loads((next(run_dir.glob("03-validate-*")) / "report.json").read_text())
    assert report["passed"] and report["graph"] == "fused", report["failures"]
    assert report["metrics"]["batch_greedy_agreement"] == 1.0
    reference = load_torch_model(next(run_dir.glob("01-quantize-*")))  # the weights the graphs hold
    assert_graphs_match_torch(next(run_dir.glob("02-export-*")), reference, (20, 48), atol=1e-3)  # within, past


# Weights 5x the default spread: attention that is not uniform, so that a wrong rotary layout, norm or scale in
# the GGUF shows in llama.cpp's predictions (at the default spread every one of them goes unnoticed).
SHARP = {"initializer_range": 0.1}
GGUF_SETTINGS = {  # where llama.cpp hard-codes what the family's real models use, the tiny one uses it too
    "smollm3": {"no_rope_layer_interval": 4},  # layer 3 without rotary
    "gemma2": {"query_pre_attn_scalar": 32},  # = head_dim
    "gemma3_text": {"query_pre_attn_scalar": 32, "rope_local_base_freq": 10000.0},
    "mistral": {"sliding_window": None},
    # Llama 3.1's rope scaling, taken from the 32nd position on: llama.cpp gets it as rope_freqs.weight
    "llama": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    },
}


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_every_family_runs_in_each_targets_engine_as_in_our_runner(tmp_path, eval_text, family):
    """Our INT4 codes in llama.cpp's graph for the family, in transformers from the compressed-tensors checkpoint
    and in onnxruntime-genai from the portable graph predict what our runner's fused graph predicts. For GGUF,
    measured with each wrong on purpose: Q/K rows not interleaved for llama and SmolLM3, interleaved for Qwen2
    and OLMo 2, Gemma's norms without the 1, Gemma 2 without its soft caps, llama3 scaling dropped, Gemma 3's
    sliding pattern or linear scaling dropped: top-1 agreement 0 to 0.87 (perplexity up to 11 % off, but only
    0.04 % for SmolLM3's rows: top-1 is what catches it)."""
    model = make_checkpoint(tmp_path / family, family, layers=4, settings={**SHARP, **GGUF_SETTINGS.get(family, {})})
    gates = {f"{t}_perplexity_vs_onnx_pct": 0.5 for t in ("gguf", "hf_quantized", "genai")}
    gates |= {f"{t}_onnx_top1_agreement": 0.93 for t in ("gguf", "hf_quantized", "genai")}
    thresholds = json.dumps(gates)
    quantize = "{method: rtn, group_size: 32}"
    targets = "[onnx, gguf, hf-quantized]"
    run_dir = run(
        write_targets_recipe(tmp_path, model, eval_text, quantize, targets, thresholds), workdir=tmp_path / "w"
    )
    report = json.loads(next(run_dir.glob("*-validate-*/report.json")).read_text())
    assert all(report["targets"][t]["validated"] for t in ("gguf", "hf-quantized", "genai")), report["targets"]
    assert report["passed"], report["failures"]
    reader = gguf.GGUFReader(str(next(run_dir.glob("*-export-*")) / "gguf" / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == gguf.MODEL_ARCH_NAMES[GGUF_FAMILIES[family].arch]


def test_a_family_we_do_not_export_stops_after_the_model_step(tmp_path, eval_text):
    model = make_checkpoint(tmp_path / "cohere", "cohere", layers=2)
    recipe = _recipe(tmp_path, model, eval_text, QUANTIZE["rtn"])
    with pytest.raises(StageError, match=r"model family 'cohere' is not supported for export; supported: llama, "):
        run(recipe, workdir=tmp_path / "w")
    assert [p.name.split("-")[1] for p in (tmp_path / "w" / "family").glob("0*")] == ["model"]  # no quantize step
