"""The shipped templates are for any model: a user's own checkpoint goes through one with `--model`, and the
SmolLM2 recipes are the templates with the reference's settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, make_checkpoint

from pipeline import load_recipe

TEMPLATES = ("fp32", "int4-rtn", "int4-gptq", "int4-cuda", "w8a8", "distill-int4")


def optimize(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_a_users_first_commands_on_their_own_checkpoint(tmp_path):
    """The README's three commands with a local HF folder typed relative to where the user stands."""
    make_checkpoint(tmp_path / "my-model", "qwen2", max_positions=1024)
    built = optimize(str(ROOT / "recipes" / "int4-gptq.yaml"), "--model", "my-model", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    run_dir = tmp_path / "artifacts" / "my-model-int4-gptq"
    assert f"done: {Path('artifacts') / 'my-model-int4-gptq'}" in built.stdout + built.stderr
    assert sorted(p.name.split("-")[1] for p in run_dir.glob("0*-*")) == ["export", "model", "quantize", "validate"]
    assert "deprecated" not in built.stderr  # library notices that say nothing to the user stay out

    answer = optimize("generate", str(run_dir), "Hello", "--max-new-tokens", "4", cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert "4 new" in answer.stderr


def test_the_smollm2_recipes_are_the_templates_with_the_references_settings():
    budget = load_recipe(ROOT / "recipes" / "smollm2-int4-gptq.yaml").stages[0].config.budget
    assert budget.max_size_mb == 98 and budget.max_size_ratio is None
    assert load_recipe(ROOT / "recipes" / "int4-gptq.yaml").stages[0].config.budget.max_size_ratio == 1.25
    distill = load_recipe(ROOT / "recipes" / "smollm2-distill-int4.yaml").stages[0].config
    assert distill.num_layers == 20 and distill.keep_fraction is None
    for name in TEMPLATES:
        template = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        reference = load_recipe(ROOT / "recipes" / f"smollm2-{name}.yaml")
        assert template.name == f"SmolLM2-135M-Instruct.Q4_1-{name}" and reference.name == f"smollm2-{name}"
        assert template.source == reference.source
        assert [s.name for s in template.stages] == [s.name for s in reference.stages]
        if name not in ("int4-gptq", "distill-int4"):
            assert template.stages == reference.stages, name
