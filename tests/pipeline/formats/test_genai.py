"""onnxruntime-genai runs the export folder as it is (genai_config.json beside the portable graph), and
the validate stage measures it; the model step's tokenizer fix keeps every id while making genai read it."""

import json
import sys

import numpy as np
import pytest
from conftest import CORPUS, write_recipe

from pipeline import run
from pipeline.models import fix_byte_level_bpe


def test_genai_config_describes_the_portable_graph(tiny_export):
    config = json.loads((tiny_export / "genai_config.json").read_text())
    contract = json.loads((tiny_export / "io_contract.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == contract["model_file"] == "model.onnx"
    assert decoder["num_hidden_layers"] == contract["num_layers"] and decoder["head_size"] == contract["head_dim"]
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert config["search"]["past_present_share_buffer"] is False  # the portable graph concatenates its past
    generation = json.loads((tiny_export / "generation_config.json").read_text())
    assert config["model"]["eos_token_id"] == sorted(generation["eos_token_id"])


def test_genai_runs_our_graph_to_our_runners_tokens_and_logits(tiny_export):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the bench extra)")
    from runtime import Generator

    ours = Generator(tiny_export, provider="cpu", graph="portable")
    ids = ours.tokenizer.encode("The capital of France", add_special_tokens=False)
    model = og.Model(str(tiny_export))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 10)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    np.testing.assert_allclose(generator.get_output("logits")[0], ours.logits(np.array(ids)), atol=1e-5)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
    expected = ours.generate([ids], max_new_tokens=10, ignore_eos=True).tokens[0]
    assert theirs == expected[: len(theirs)] and len(theirs) > 0
    assert [int(t) for t in og.Tokenizer(model).encode("The capital of France")] == ids


def test_the_validate_stage_measures_the_artifact_through_genai(tiny_run):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the bench extra)")
    report = json.loads(next(tiny_run.glob("*-validate-*/report.json")).read_text())
    assert report["targets"]["genai"]["validated"] and "onnxruntime-genai" in report["targets"]["genai"]["engine"]
    assert report["metrics"]["genai_perplexity_vs_onnx_pct"] < 0.01  # the same weights; only the graph flavour differs
    assert report["metrics"]["genai_onnx_top1_agreement"] >= 0.99


def test_without_genai_the_report_says_so_and_its_gates_fail(tmp_path, tiny_llama, eval_text, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    recipe = write_recipe(
        tmp_path, tiny_llama, eval_text, extra_validate="thresholds: {genai_perplexity_vs_onnx_pct: 1}"
    )
    from pipeline import ValidationFailed

    with pytest.raises(ValidationFailed, match="genai_perplexity_vs_onnx_pct = None"):
        run(recipe, workdir=tmp_path / "artifacts")
    report = json.loads(next((tmp_path / "artifacts").glob("*/*-validate-*/report.json")).read_text())
    assert (
        report["targets"]["genai"]["validated"] is False
        and "onnxruntime-genai" in report["targets"]["genai"]["install"]
    )


def test_byte_fallback_is_dropped_from_a_byte_level_bpe_without_changing_an_id(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.ByteLevel()])
    tok.train_from_iterator(
        [CORPUS],
        trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    text = CORPUS + " héllo ✓ 日本語\n\t  spaces"
    before = tok.encode(text).ids
    assert fix_byte_level_bpe(path)
    fixed = Tokenizer.from_file(str(path))
    assert fixed.encode(text).ids == before and fixed.decode(before) == tok.decode(before)
    assert json.loads(path.read_text())["model"]["byte_fallback"] is False
    assert not fix_byte_level_bpe(path)  # already plain: left alone
