"""A short distillation of SmolLM2-135M-Instruct to 20 layers (with a two-step teacher correction), exported and
run (slow tier; CI runs it).
The full budget and its numbers: recipes/smollm2-distill-int4.yaml and benchmarks/experiments/distill_matrix.py."""

import json
import textwrap

import pytest
from conftest import REFERENCE_GGUF, reference_workdir

from pipeline import run
from runtime import Generator, find_model_folder

pytestmark = [pytest.mark.slow, pytest.mark.serial]


def test_twenty_layer_student_trains_exports_and_generates(tmp_path, tmp_path_factory):
    if not REFERENCE_GGUF.exists():
        pytest.fail(f"{REFERENCE_GGUF} is missing: run `make model`")
    recipe = tmp_path / "short-distill.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: short-distill
        model: {{source: {REFERENCE_GGUF}}}
        stages:
          - distill: {{num_layers: 20, layer_choice: hidden, tokens: 8192, batch_size: 4, grad_accum: 2,
                       eval_every: 2, checkpoint_every: 2, eval_samples: 4, importance_samples: 4,
                       teacher_answers: {{samples: 16, max_new_tokens: 96, batch_size: 16}},
                       teacher_correction: {{tokens: 4096}}}}
          - export: {{}}
        """)
    )
    run_dir = run(recipe, workdir=reference_workdir(tmp_path_factory))
    step = next(run_dir.glob("01-distill-*"))
    manifest = json.loads((step / "manifest.json").read_text())
    assert json.loads((step / "config.json").read_text())["num_hidden_layers"] == 20
    m = manifest["metrics"]
    assert m["parameters"] < 0.8 * m["teacher_parameters"]
    assert m["corrected_teacher_perplexity"] < m["teacher_perplexity"]  # two steps on the text already adapt it
    assert m["pruned_perplexity"] > m["corrected_teacher_perplexity"]  # ten layers fewer cost something
    assert m["perplexity"] < m["pruned_perplexity"]  # four steps of KD already win some of it back
    answers = [json.loads(line) for line in (step / "teacher_answers.jsonl").read_text().splitlines()]
    assert len(answers) == m["teacher_answers"] >= 4  # the instruct teacher ends most of its turns
    assert sum("paris" in r["teacher"].lower() for r in manifest["sample_replies"]) == 1
    gen = Generator(find_model_folder(run_dir), provider="cpu")
    ids = gen.tokenizer.encode_chat("What is the capital of France?")
    assert len(gen.generate([ids], 8, ignore_eos=True).tokens[0]) == 8
