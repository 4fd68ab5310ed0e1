"""ONNX Runtime's CPU MatMulInteger with the same integers carried three ways: int8 x int8,
uint8 x int8 and uint8 x uint8 (uint8 = int8 code + 128, zero point 128).

    .venv/bin/python -m benchmarks.experiments.matmul_integer_kernels

Why our W8A8 graphs carry both operands as uint8: int8 x int8 has no fast kernel (19-28x slower
on an AVX-512 machine), and uint8 x int8 sums pairs of products in saturating 16-bit lanes on x86
CPUs with AVX2 but no VNNI, so it is exact only where the CPU has VNNI. Each variant is checked
against exact integer arithmetic on random codes and on the worst case (every code 127), and timed
on one SmolLM2 down_proj-sized matmul (K 576, N 1536) at 1 and 256 rows, 2 threads, median of the
repeats. Prints a Markdown table and writes benchmarks/results/kernels/matmul_integer-<isa>.json
(the ISA this CPU reports: avx512-vnni, avx-vnni, avx2 or other).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N = 576, 1536
RESULTS = Path(__file__).resolve().parents[1] / "results" / "kernels"
VARIANTS = {
    "int8 x int8": (TensorProto.INT8, TensorProto.INT8),
    "uint8 x int8": (TensorProto.UINT8, TensorProto.INT8),
    "uint8 x uint8": (TensorProto.UINT8, TensorProto.UINT8),
}


def isa() -> str:
    try:
        flags = set(
            next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        )
    except (OSError, StopIteration):
        return "other"
    return (
        "avx512-vnni"
        if "avx512_vnni" in flags
        else "avx-vnni"
        if "avx_vnni" in flags
        else "avx2"
        if "avx2" in flags
        else "other"
    )


def carried(codes: np.ndarray, tensor_type: int) -> np.ndarray:
    return codes.astype(np.int8) if tensor_type == TensorProto.INT8 else (codes.astype(np.int16) + 128).astype(np.uint8)


def session(weights: np.ndarray, a_type: int, b_type: int) -> ort.InferenceSession:
    inits = [numpy_helper.from_array(carried(weights, b_type), "W")]
    inputs = ["A", "W"]
    for name, tensor_type in (("a_zero_point", a_type), ("b_zero_point", b_type)):
        zero = np.array(128, dtype=np.uint8) if tensor_type == TensorProto.UINT8 else np.array(0, dtype=np.int8)
        inits.append(numpy_helper.from_array(zero, name))
        inputs.append(name)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", inputs, ["Y"])],
        "matmul_integer",
        [helper.make_tensor_value_info("A", a_type, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, N])],
        inits,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, a: np.ndarray, repeats: int) -> float:
    for _ in range(5):
        sess.run(None, {"A": a})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sess.run(None, {"A": a})
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(1)
    weights = rng.integers(-127, 128, (K, N))
    worst_w, worst_a = np.full((K, N), 127), np.full((4, K), 127)
    rows = []
    for name, (a_type, b_type) in VARIANTS.items():
        sess, worst = session(weights, a_type, b_type), session(worst_w, a_type, b_type)
        row = {"variant": name}
        random_a = rng.integers(-127, 128, (64, K))
        got = sess.run(None, {"A": carried(random_a, a_type)})[0]
        row["exact_random"] = bool(np.array_equal(got, random_a @ weights))
        got = worst.run(None, {"A": carried(worst_a, a_type)})[0]
        row["worst_case_max_error"] = int(np.abs(got.astype(np.int64) - worst_a @ worst_w).max())
        for m in (1, 256):
            codes = carried(rng.integers(-127, 128, (m, K)), a_type)
            row[f"ms_{m}_rows"] = median_ms(sess, codes, 200 if m == 1 else 20)
        rows.append(row)
    cpu = isa()
    print(f"CPU: {platform.processor() or platform.machine()} ({cpu}); onnxruntime {ort.__version__}\n")
    print(
        "| variant | exact, random codes | max error, every code 127 | ms, 1 row | ms, 256 rows |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['variant']} | {r['exact_random']} | {r['worst_case_max_error']} | {r['ms_1_rows']:.3f} | "
            f"{r['ms_256_rows']:.3f} |"
        )
    out = RESULTS / f"matmul_integer-{cpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"onnxruntime": ort.__version__, "isa": cpu, "k": K, "n": N, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
