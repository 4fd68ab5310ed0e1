"""A validate step gates what came before it; a recipe's thresholds merge over those defaults key by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import run
from pipeline.artifacts import Artifact
from pipeline.stages.validate.gates import DISTILLED_PERPLEXITY_PCT, FLOAT_PARITY, default_gates, gates_for


def step(stage: str, **config) -> Artifact:
    return Artifact(Path(stage), {"stage": stage, "config": config})


@pytest.mark.parametrize(
    ("history", "gates", "why"),
    [
        ([step("model"), step("export")], FLOAT_PARITY, "float parity"),
        (
            [step("model"), step("quantize", method="rtn", bits=4), step("export")],
            {"perplexity_delta_pct": 40.0, "decode_logits_max_abs_diff": 3.0},
            "rtn 4-bit quantization",
        ),
        (
            [step("model"), step("quantize", method="gptq", bits=4), step("export")],
            {"perplexity_delta_pct": 15.0, "decode_logits_max_abs_diff": 3.0},
            "gptq 4-bit",
        ),
        (
            [step("model"), step("quantize", method="rtn", bits=8), step("export")],
            {"perplexity_delta_pct": 1.0, "decode_logits_max_abs_diff": 3.0},
            "rtn 8-bit",
        ),
        (
            [step("model"), step("quantize", method="w8a8", bits=8), step("export")],
            {"perplexity_delta_pct": 2.0},
            "w8a8",
        ),
        (
            [step("model"), step("distill"), step("export")],
            {"perplexity_delta_pct": DISTILLED_PERPLEXITY_PCT, "decode_logits_max_abs_diff": 0.01},
            "distilled student",
        ),
        (
            [step("model"), step("distill"), step("quantize", method="rtn", bits=4), step("export")],
            {"perplexity_delta_pct": DISTILLED_PERPLEXITY_PCT, "decode_logits_max_abs_diff": 3.0},
            "rtn 4-bit quantization and a distilled student",
        ),
    ],
)
def test_the_default_gates_follow_the_steps_before(history, gates, why):
    got, reason = default_gates(history)
    assert got == gates and why in reason


def test_a_quantized_run_without_thresholds_is_gated_as_quantized(tmp_path, tiny_llama, eval_text):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(
        f"model: {{source: {tiny_llama}}}\n"
        "stages:\n"
        f"  - quantize: {{method: rtn, bits: 4, group_size: 16}}\n"
        "  - export: {}\n"
        f"  - validate: {{eval_data: {{source: {eval_text}}}, context_length: 64, max_windows: 4}}\n"
    )
    run_dir = run(recipe, workdir=tmp_path / "a")
    folder = next(run_dir.glob("03-validate-*"))
    report = json.loads((folder / "report.json").read_text())
    assert report["thresholds"] == {"perplexity_delta_pct": 40.0, "decode_logits_max_abs_diff": 3.0}
    assert report["thresholds_from"] == "rtn 4-bit quantization" and report["passed"]
    assert "- gates: by default, for rtn 4-bit quantization" in (folder / "report.md").read_text()


def test_a_recipes_thresholds_merge_over_the_defaults_key_by_key():
    rtn = [step("model"), step("quantize", method="rtn", bits=4), step("export")]
    gates, why = gates_for({"perplexity_delta_pct": 25.0, "kl_divergence": 0.2}, True, rtn)
    assert gates == {"perplexity_delta_pct": 25.0, "decode_logits_max_abs_diff": 3.0, "kl_divergence": 0.2}
    assert why == "rtn 4-bit quantization; the recipe's thresholds over them"
    gates, _ = gates_for({"decode_logits_max_abs_diff": None}, True, rtn)  # null drops a default gate
    assert gates == {"perplexity_delta_pct": 40.0}
    assert gates_for({}, True, rtn) == default_gates(rtn)
    assert gates_for({"top1_agreement": 0.9}, False, rtn) == ({"top1_agreement": 0.9}, "the recipe's thresholds")
    assert gates_for({}, False, rtn) == ({}, "none: every metric reported, none gates")


def test_a_null_threshold_and_default_gates_load_from_a_recipe(tmp_path, tiny_llama, eval_text):
    from pipeline.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{source: {tiny_llama}}}\nstages:\n  - export: {{}}\n"
        f"  - validate: {{eval_data: {{source: {eval_text}}}, thresholds: {{top1_agreement: null}}, default_gates: false}}\n"
    )
    validate = load_recipe(recipe).stages[1].config
    assert validate.thresholds == {"top1_agreement": None} and validate.default_gates is False
