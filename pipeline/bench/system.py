"""Machine facts for the bench: CPU, cores, GPU, library versions, memory, read bandwidth."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.artifacts import library_versions
from runtime.machine import cpu_model, nvidia_smi

LIBRARIES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-genai",
    "numpy",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "llama-cpp-python",
)


def machine() -> dict:
    import onnxruntime as ort

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": nvidia_smi(),
        "versions": library_versions(LIBRARIES),
        # where both onnxruntime and onnxruntime-gpu are installed, the one Python imports
        "onnxruntime_imported": f"{ort.__version__} ({', '.join(ort.get_available_providers())})",
    }


def envelope(command: str, code: tuple[str, ...] = ("pipeline", "runtime", "calibration", "recipes")) -> dict:
    """Where a measurement came from, for a results file: date, commit (with "+" when the measured code
    has uncommitted changes), the command, the machine and the library versions. Taken as the run starts,
    so edits made while it runs are not attributed to it."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--", *code):
        commit += "+"
    from pipeline.artifacts import library_versions

    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit or "unknown (not a git checkout)",
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "versions": library_versions(),
    }


def rss_bytes(peak: bool = False) -> int:
    """Resident memory of this process now (or its peak so far)."""
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gpu_memory_used_mb() -> float | None:
    """Memory in use on the first GPU (all processes; the bench's figure is a difference of two readings)."""
    used = nvidia_smi("memory.used")  # "1234 MiB"
    return float(used.splitlines()[0].split()[0]) if used else None


def read_bandwidth_gbs(threads: int = 0, megabytes: int = 512, repeats: int = 5, provider: str = "cpu") -> float:
    """Best-of-`repeats` read of a float matrix far larger than the caches by ONNX Runtime's
    matrix-vector product (the kernel of a decode step), with the bench's threads; on "cuda" the
    matrix sits in GPU memory."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k = 4096
    n = megabytes * 2**20 // 4 // k
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "read_bandwidth",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
    )
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    device = "cuda" if provider == "cuda" else "cpu"
    session = ort.InferenceSession(
        model.SerializeToString(),
        opts,
        providers=["CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"],
    )
    weights = np.ones((k, n), dtype=np.float32)  # an input, not an initializer: read as stored, never prepacked
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(np.ones((1, k), dtype=np.float32), device, 0))
    binding.bind_ortvalue_input("w", ort.OrtValue.ortvalue_from_numpy(weights, device, 0))
    binding.bind_output("y", device)
    session.run_with_iobinding(binding)  # warm-up: CUDA kernels and cuBLAS handles are made on first use
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        best = min(best, time.perf_counter() - t)
    return weights.nbytes / best / 1e9
