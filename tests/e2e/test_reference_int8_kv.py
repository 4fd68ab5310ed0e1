"""An int8 KV cache on SmolLM2-135M-Instruct (slow tier; CI runs it): the INT4 RTN recipe exported with
`kv_cache: int8`, its prompts through the float-cache twin graph, its decode steps in the int8 graph."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CI_WINDOWS, run_reference_recipe

from pipeline.cli import main
from runtime import Generator, find_model_folder
from runtime.fused import FusedGraph
from runtime.serve.slots import SlotCache

pytestmark = [pytest.mark.slow, pytest.mark.serial]


@pytest.fixture(scope="module")
def int8_kv_run(tmp_path_factory):
    return run_reference_recipe(
        "smollm2-int4-rtn.yaml", tmp_path_factory, (CI_WINDOWS, "name=smollm2-int4-rtn-kv8", "export.kv_cache=int8")
    )


def test_int8_cache_recipe_passes_its_gates_with_the_twin_graph(int8_kv_run):
    report = json.loads(next(int8_kv_run.glob("*-validate-*/report.json")).read_text())
    assert report["passed"], report["failures"]
    export = json.loads(next(int8_kv_run.glob("*-export-*/manifest.json")).read_text())
    assert export["parity_by_graph"]["fused"] < 0.5  # SmolLM2 measures 0.12 against PyTorch rounding alike
    gen = Generator(find_model_folder(int8_kv_run), provider="cpu")
    assert gen.float_prefill is not None and gen.contract.kv_dtype == "int8"


def test_the_twin_prompt_lands_where_the_int8_kernel_does(int8_kv_run):
    """A 300-token prompt through the twin and through the int8 graph itself: the same next token, logits
    apart only by the prompt's own attention (float against codes), and the same codes in layer 0."""
    gen = Generator(find_model_folder(int8_kv_run), provider="cpu")
    prompt = gen.tokenizer.encode(
        "The history of the city begins in the Roman period. " * 30, add_special_tokens=False
    )[:300]
    twin_logits, twin = gen.prefill([prompt])
    kernel_logits, kernel = FusedGraph(gen.session, gen.contract, gen.pad_id).prefill([prompt])
    assert int(np.argmax(twin_logits)) == int(np.argmax(kernel_logits))
    assert np.abs(twin_logits - kernel_logits).max() < 2.0
    np.testing.assert_array_equal(twin.cache.host[0][:, :, :300], kernel.cache.host[0][:, :, :300])


def test_int8_cache_artifact_answers_alone_and_in_slots_alike(int8_kv_run):
    result = CliRunner().invoke(
        main, ["generate", str(int8_kv_run), "What is the capital of France?", "--max-new-tokens", "24"]
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output and "prompts through the float-cache graph" in result.output
    gen = Generator(find_model_folder(int8_kv_run), provider="cpu")
    questions = [gen.tokenizer.encode_chat(q) for q in ("What is the capital of France?", "Name three colors.")]
    alone = [gen.generate([q], 16, ignore_eos=True).tokens[0] for q in questions]
    # without prefix reuse: the second question would reuse the first one's chat template from its codes,
    # where alone it attends over the template's float keys and values (equal up to the cache's rounding)
    slots = SlotCache(gen.session, gen.contract, 2, 128, reuse_prefixes=False, float_prefill=gen.float_prefill)
    out = [[int(np.argmax(slots.prefill(row, q)))] for row, q in enumerate(questions)]
    for _ in range(15):
        logits = slots.decode(np.array([o[-1] for o in out]))
        for row, o in enumerate(out):
            o.append(int(np.argmax(logits[row])))
    assert out == alone
