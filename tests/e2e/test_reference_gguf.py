"""The shipped GGUF recipe on SmolLM2-135M-Instruct: one set of INT4 codes, two engines (slow tier; CI runs it)."""
import json

import pytest

from conftest import run_reference_recipe

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make engines` (make test does it)")


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    return run_reference_recipe("smollm2-int4-gguf.yaml", tmp_path_factory)


def test_llama_cpp_gives_the_onnx_artifacts_model(gguf_run):
    report = json.loads(next(gguf_run.glob("*-validate-*/report.json")).read_text())
    assert report["passed"], report["failures"]
    assert report["targets"]["gguf"]["validated"]
    assert report["metrics"]["gguf_perplexity_vs_onnx_pct"] < 0.5
    manifest = json.loads(next(gguf_run.glob("*-export-*/gguf/manifest.json")).read_text())
    assert manifest["tensor_types"] == {"F32": 61, "Q4_1": 211} and manifest["converted_layers"] == []
    assert manifest["tokenizer"].startswith("copied from")


def test_llama_cpp_and_our_runner_begin_the_same_chat_answer(gguf_run):
    """The GGUF's copied tokenizer and chat template give llama.cpp the prompt our runner builds, and the
    same codes give the same first words (INT4 everywhere, the head included, answers oddly: both alike)."""
    from llama_cpp import Llama

    from runtime import Generator, find_model_folder

    question = "What is the capital of France?"
    ours = Generator(find_model_folder(gguf_run), provider="cpu")
    ids = ours.tokenizer.encode_chat(question)
    our_text = ours.tokenizer.decode(ours.generate([ids], max_new_tokens=16).tokens[0])
    llm = Llama(model_path=str(next(gguf_run.glob("*-export-*/gguf/model.gguf"))), n_ctx=256, verbose=False)
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16)
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"].split()[:4] == our_text.split()[:4]
