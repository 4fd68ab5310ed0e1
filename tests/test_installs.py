"""The installs the README promises, each built as a user would build it (pip, from the clone).

The runtime-only install gets a fresh virtual environment and must generate from an artifact without
torch or transformers; the CUDA pipeline install is resolved (not downloaded) and must not bring the CPU
onnxruntime beside onnxruntime-gpu.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True
    )


def test_the_runtime_only_install_generates_without_torch(tmp_path, tiny_export):
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    installed = pip(python, "install", "--quiet", f"{ROOT}[cpu]")
    assert installed.returncode == 0, installed.stderr[-2000:]

    for heavy in ("torch", "transformers", "datasets", "accelerate"):
        probe = subprocess.run([str(python), "-c", f"import {heavy}"], capture_output=True, text=True)
        assert probe.returncode != 0, f"{heavy} came with the runtime-only install"

    optimize = env / "bin" / "optimize"
    out = subprocess.run(
        [str(optimize), "generate", str(tiny_export), "The capital of France", "--max-new-tokens", "4", "--no-chat"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()

    # what needs the pipeline says so in one line, exit 2, no traceback
    plan = subprocess.run([str(optimize), "plan", "recipe.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert plan.returncode == 2 and "Traceback" not in plan.stderr
    assert plan.stderr.strip().count("\n") == 0 and "llm-optimize[pipeline,cpu]" in plan.stderr


def test_the_cuda_pipeline_install_leaves_out_the_cpu_onnxruntime(tmp_path):
    report = tmp_path / "report.json"
    resolved = pip(
        Path(sys.executable), "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        f"{ROOT}[pipeline,cuda]",
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names and "torch" in names
    assert "onnxruntime" not in names
