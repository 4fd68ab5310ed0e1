"""The shipped default recipe on the real reference model, SmolLM2-135M-Instruct (slow tier; CI runs it)."""

import json
import time

import pytest
import torch
from click.testing import CliRunner
from conftest import CI_WINDOWS, ROOT, run_reference_recipe

from pipeline import run
from pipeline.cli import main
from runtime import Generator, find_model_folder

pytestmark = [pytest.mark.slow, pytest.mark.serial]
RECIPE = ROOT / "recipes" / "smollm2-fp32.yaml"


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    return run_reference_recipe(RECIPE.name, tmp_path_factory)


@pytest.fixture(scope="module")
def smol(smol_run):
    return Generator(find_model_folder(smol_run), provider="cpu")


def test_default_recipe_meets_the_accuracy_gates(smol_run):
    report = json.loads(next(smol_run.glob("02-validate-*/report.json")).read_text())
    m = report["metrics"]
    assert report["passed"], report["failures"]
    assert abs(m["perplexity_delta_pct"]) < 0.1
    assert m["perplexity_baseline"] == pytest.approx(
        27.61, abs=0.05
    )  # WikiText-2 test, the first 8 x 512 tokens (40: 25.62)
    assert m["greedy_token_agreement"] == 1.0 and m["batch_greedy_agreement"] == 1.0
    assert m["decode_logits_max_abs_diff"] < 1e-2 and m["top1_agreement"] > 0.999


def test_the_streamed_reference_computes_the_whole_models_logits(smol_run):
    """Past WHOLE_MODEL_LIMIT validate and export compare with the layer-streamed model: on the reference model
    its logits are the whole model's, bit for bit; the reference model itself is validated whole."""
    from pipeline.models import load_torch_model
    from pipeline.streamed import load_streamed_model

    step = next(smol_run.glob("00-model-*"))
    ids = torch.randint(0, 49152, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_torch_model(step)(ids).logits, load_streamed_model(step)(ids).logits)
    report = json.loads(next(smol_run.glob("02-validate-*/report.json")).read_text())
    assert report["torch_reference"] == "whole model"


def test_gguf_quirks_are_fixed_in_the_model_step(smol_run):
    """transformers 4.57's GGUF loader names <|im_start|> both BOS and EOS and bolts SentencePiece's byte
    fallback onto the byte-level BPE, which the model step fixes (and records); 5.x loads both right.
    On either stack the step ends turns on <|im_end|>, with a plain byte-level BPE and a tokenizer class
    that both stacks load."""
    step = next(smol_run.glob("00-model-*"))
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["eos_token_ids"] == [2]  # <|im_end|>
    if manifest["versions"]["transformers"].startswith("4."):
        assert any("EOS is now <|im_end|>" in fix for fix in manifest["fixes"]), manifest["fixes"]
    tokenizer = json.loads((step / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE" and not tokenizer["model"].get("byte_fallback")
    config = json.loads((step / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["tokenizer_class"] != "TokenizersBackend"
    assert not list(step.glob("tokenizer.model"))


def test_second_run_is_all_cache_hits(smol_run, capsys):
    started = time.time()
    run(RECIPE, workdir=smol_run.parent, overrides=(CI_WINDOWS,))
    out = capsys.readouterr().out
    assert out.count("unchanged") == 3 and "running" not in out
    assert time.time() - started < 60


def test_chat_answer_through_the_cli(smol_run):
    result = CliRunner().invoke(
        main, ["generate", str(smol_run), "What is the capital of France?", "--max-new-tokens", "24"]
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output and "CPUExecutionProvider" in result.output
    assert "(stop)" in result.output  # ended on <|im_end|>, not on the token limit


def test_batch_of_four_mixed_length_chat_prompts_equals_one_by_one(smol):
    questions = [
        "What is the capital of France?",
        "Name a color.",
        "Explain in one sentence why the sky is blue during the day.",
        "What is 2 + 2?",
    ]
    prompts = [smol.tokenizer.encode_chat(q) for q in questions]
    assert len({len(p) for p in prompts}) == 4
    single = [smol.generate([p], 24).tokens[0] for p in prompts]
    assert smol.generate(prompts, 24).tokens == single


@pytest.mark.optimum
def test_optimum_loads_and_generates_the_same_tokens(smol, smol_run, ort_causal_lm):
    folder = find_model_folder(smol_run)
    model = ort_causal_lm.from_pretrained(folder, use_cache=True, use_io_binding=False)
    ids = smol.tokenizer.encode_chat("What is the capital of France?")
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=sorted(smol.eos_ids),
    )
    theirs = [t for t in out[0, len(ids) :].tolist() if t not in smol.eos_ids]
    ours = smol.generate([ids], 24)
    assert ours.finish_reasons[0] == "stop" and len(ours.tokens[0]) > 3
    assert theirs == ours.tokens[0]


def test_fused_graph_matches_pytorch_and_the_portable_graph(smol, smol_run):
    """The runner's default (fused) graph against PyTorch on a real prompt, and greedy equal to the portable graph."""
    from pipeline.models import load_torch_model

    assert smol.flavour == "fused"
    export = json.loads(next(smol_run.glob("01-export-*/manifest.json")).read_text())
    assert set(export["parity_by_graph"]) == {"portable", "fused"} and max(export["parity_by_graph"].values()) < 1e-3
    ids = smol.tokenizer.encode(
        "The history of the city begins in the early middle ages, when", add_special_tokens=False
    )
    model = load_torch_model(next(smol_run.glob("00-model-*")))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert abs(smol.logits(ids) - ref).max() < 1e-3
    portable = Generator(find_model_folder(smol_run), provider="cpu", graph="portable")
    prompts = [smol.tokenizer.encode_chat(q) for q in ["Name a color.", "What is the capital of France?"]]
    assert smol.generate(prompts, 16, ignore_eos=True).tokens == portable.generate(prompts, 16, ignore_eos=True).tokens
