"""The `optimize` command as users type it, through click's CliRunner."""

import re

from click.testing import CliRunner
from conftest import write_recipe

from pipeline.cli import main


def test_recipe_path_is_the_first_argument(tmp_path, tiny_llama, eval_text):
    recipe = write_recipe(tmp_path, tiny_llama, eval_text)
    result = CliRunner().invoke(main, [str(recipe), "--workdir", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "[01] export: done" in result.output and "[02] validate: done" in result.output
    again = CliRunner().invoke(main, [str(recipe), "--workdir", str(tmp_path / "a")])
    assert again.output.count("unchanged") == 3


def test_bad_recipe_is_one_line_and_exit_2(tmp_path, tiny_llama):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"model: {{source: {tiny_llama}}}\nstages:\n  - export: {{opst: 17}}\n")
    result = CliRunner().invoke(main, [str(recipe)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert re.search(r"bad.yaml: stages\[0\]\.export\.opst: unknown key \(did you mean 'opset'\?\)", lines[0])


def test_missing_recipe_exit_2(tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_failed_gate_exit_1_names_metric(tmp_path, tiny_llama, eval_text):
    recipe = write_recipe(tmp_path, tiny_llama, eval_text, extra_validate="thresholds: {perplexity: 2.0}\n")
    result = CliRunner().invoke(main, [str(recipe), "--workdir", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert re.search(r"validation failed .*report.md\): perplexity = [\d.]+ > max 2", result.output)


def test_generate_streams_and_names_the_provider(tiny_run):
    result = CliRunner().invoke(main, ["generate", str(tiny_run), "The capital of France", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "fused graph on CPUExecutionProvider" in result.output and "KV cache (float32): " in result.output
    assert re.search(r"\d+ prompt tokens, \d+ new", result.output)


def test_generate_bad_artifact(tmp_path):
    result = CliRunner().invoke(main, ["generate", str(tmp_path), "hi"])
    assert result.exit_code == 1 and "no exported model here" in result.output


def test_doctor_lists_versions_and_providers():
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0
    assert "onnxruntime providers: " in result.output and "CPUExecutionProvider" in result.output
    assert re.search(r"^torch \d", result.output, re.M)


def test_model_flag_runs_the_recipe_on_another_model_in_a_folder_named_for_both(
    tmp_path, tiny_llama, tiny_qwen2, eval_text, monkeypatch
):
    import json

    recipe = write_recipe(tmp_path, tiny_llama, eval_text, name="tiny")
    monkeypatch.chdir(tiny_qwen2.parent)  # the model given relative to where the command runs
    result = CliRunner().invoke(main, [str(recipe), "--model", tiny_qwen2.name, "--workdir", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "a" / f"{tiny_qwen2.name}-tiny"
    model_step = json.loads(next(run_dir.glob("00-model-*/manifest.json")).read_text())
    assert model_step["config"]["source"] == str(tiny_qwen2.resolve())
    named = CliRunner().invoke(
        main, [str(recipe), "--model", str(tiny_qwen2), "--set", "name=mine", "--workdir", str(tmp_path / "a")]
    )
    assert named.exit_code == 0 and (tmp_path / "a" / "mine" / "run.json").is_file()
    missing = CliRunner().invoke(main, [str(recipe), "--model", "./no-such-folder", "--workdir", str(tmp_path / "a")])
    assert missing.exit_code == 2 and "model.source" in missing.output


def test_library_notices_stay_out_of_a_run_unless_debug():
    """What `optimize RECIPE` does first (without --debug): transformers' logger and the libraries' warnings quiet."""
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "from pipeline.cli import quiet_libraries\n"
        "if sys.argv[1] == 'quiet': quiet_libraries()\n"
        "from transformers.utils import logging\n"
        "logging.get_logger('transformers.tokenization_utils').warning('default legacy behaviour')\n"
        "warnings.warn_explicit('torch_dtype is deprecated', FutureWarning, 'x.py', 1, module='transformers.x')\n"
        "warnings.warn_explicit('ours', UserWarning, 'y.py', 1, module='pipeline.y')\n"
    )
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # as a fresh shell has it
    for mode, expect in (("quiet", False), ("debug", True)):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert ("default legacy behaviour" in out.stderr) is expect, mode
        assert ("torch_dtype is deprecated" in out.stderr) is expect, mode
        assert "ours" in out.stderr  # the project's own warnings are never filtered
