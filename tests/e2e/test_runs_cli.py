"""`optimize runs`, `optimize show RUN` and `optimize --version`: finding runs and their results from the command line."""

import json
import shutil
from importlib import metadata

from click.testing import CliRunner

from pipeline.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"optimize, version {metadata.version('llm-optimize')}"


def test_runs_lists_each_run_with_its_model_steps_status_size_and_accuracy(tiny_run, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(tiny_run, workdir / "tiny")
    failed = workdir / "broken"
    shutil.copytree(tiny_run, failed)
    record = json.loads((failed / "run.json").read_text())
    record.update(status="failed", steps=record["steps"][:2], finished=record["finished"] + 60)
    (failed / "run.json").write_text(json.dumps(record))
    (workdir / "not-a-run").mkdir()
    result = CliRunner().invoke(main, ["runs", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    header, first, second = result.output.strip().splitlines()
    assert header.split()[:5] == ["run", "model", "steps", "status", "graph"]
    assert first.startswith("broken") and "failed" in first and "model → export" in first  # newest first
    assert second.startswith("tiny") and "passed" in second and "model → export → validate" in second
    assert "ppl " in second and "top-1 " in second
    export = json.loads(next((tiny_run).glob("01-export-*/manifest.json")).read_text())
    size = sum(f["bytes"] for n, f in export["files"].items() if n.startswith("fused/model.onnx"))
    assert f"{size / 1e6:.1f}" in second


def test_show_prints_the_steps_the_validation_summary_and_how_to_use_the_run(tiny_run):
    result = CliRunner().invoke(main, ["show", str(tiny_run)])
    assert result.exit_code == 0, result.output
    assert "status: passed" in result.output and "# Validation report: PASSED" in result.output
    assert "| perplexity_delta_pct |" in result.output and "## Greedy samples" not in result.output
    assert f"optimize generate {tiny_run}" in result.output and f"optimize serve {tiny_run}" in result.output
    by_name = CliRunner().invoke(main, ["show", tiny_run.name, "--workdir", str(tiny_run.parent)])
    assert by_name.exit_code == 0 and by_name.output == result.output


def test_show_of_no_run_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["show", "nothing", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and "no run here" in result.output and len(result.output.strip().splitlines()) == 1
    empty = CliRunner().invoke(main, ["runs", "--workdir", str(tmp_path)])
    assert empty.exit_code == 0 and "no runs in" in empty.output
