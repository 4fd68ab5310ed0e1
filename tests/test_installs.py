"""The installs the README promises, each built as a user would build it (pip, from the clone).

The runtime-only install gets a fresh virtual environment and must generate from and bench an artifact
without torch or transformers; the CUDA installs are resolved (not downloaded) and must not bring the CPU
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

    # the bench measures the artifact on the machine that will run it (no chart without matplotlib)
    text = tmp_path / "prompt.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    bench = subprocess.run(
        [str(optimize), "bench", str(tiny_export), "--text", str(text), "--prompt-lengths", "16", "--batches", "1,2",
         "--new-tokens", "4", "--long-tokens", "16", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert (tmp_path / "b" / "bench.json").is_file() and "no chart: matplotlib is not installed" in bench.stdout
    hub = subprocess.run(
        [str(optimize), "bench", str(tiny_export), "--text", "some/dataset", "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert hub.returncode != 0 and "Traceback" not in hub.stderr and "pipeline install" in hub.stderr

    # what needs the pipeline says so in one line, exit 2, no traceback
    plan = subprocess.run([str(optimize), "plan", "recipe.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert plan.returncode == 2 and "Traceback" not in plan.stderr
    assert plan.stderr.strip().count("\n") == 0 and "llm-optimize[pipeline,cpu]" in plan.stderr


@pytest.mark.parametrize(("extras", "torch"), [("pipeline,cuda", True), ("cuda", False)])
def test_a_cuda_install_leaves_out_the_cpu_onnxruntime(tmp_path, extras, torch):
    report = tmp_path / "report.json"
    resolved = pip(
        Path(sys.executable), "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        f"{ROOT}[{extras}]",
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names and ("torch" in names) is torch
    assert "onnxruntime" not in names
