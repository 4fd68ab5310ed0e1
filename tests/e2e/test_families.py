"""Each family we export, end to end on a tiny random checkpoint made from its config: INT4 RTN, GPTQ and AWQ,
both graphs within the parity limits, validate against PyTorch, and the runner's batch equal to one by one."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from conftest import longrope, make_checkpoint

from pipeline import StageError, run
from pipeline.archs import ARCHS
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
    ids = np.random.default_rng(0).integers(0, reference.config.vocab_size, 48)
    export_dir = next(run_dir.glob("02-export-*"))
    for graph in ("portable", "fused"):  # a prompt within the original length, and one past it
        generator = Generator(export_dir, provider="cpu", graph=graph)
        for n in (20, 48):
            logits, _ = generator.prefill([ids[:n].tolist()], 64)
            with torch.no_grad():
                expected = reference(torch.tensor(ids[None, :n])).logits[0, -1].numpy()
            np.testing.assert_allclose(logits[0], expected, atol=1e-3, err_msg=f"{graph} graph, {n} tokens")


def test_a_family_we_do_not_export_stops_after_the_model_step(tmp_path, eval_text):
    model = make_checkpoint(tmp_path / "cohere", "cohere", layers=2)
    recipe = _recipe(tmp_path, model, eval_text, QUANTIZE["rtn"])
    with pytest.raises(StageError, match=r"model family 'cohere' is not supported for export; supported: llama, "):
        run(recipe, workdir=tmp_path / "w")
    assert [p.name.split("-")[1] for p in (tmp_path / "w" / "family").glob("0*")] == ["model"]  # no quantize step
