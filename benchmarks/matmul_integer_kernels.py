"""ONNX Runtime's CPU MatMulInteger with int8 x int8 against uint8 x int8 inputs (the same integers).

    .venv/bin/python benchmarks/matmul_integer_kernels.py

Why the per-token W8A8 rewrite carries its int8 activation codes as uint8 + 128 with zero point 128:
one SmolLM2 down_proj-sized matmul (K 576, N 1536; weights int8) at 1 and 256 rows, 2 threads, median
of the repeats. Prints a Markdown table and writes benchmarks/results/kernels/matmul_integer.json.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N = 576, 1536
OUT = Path(__file__).resolve().parent / "results" / "kernels" / "matmul_integer.json"


def session(a_type: int, zero_point: bool) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (K, N)).astype(np.int8), "W")]
    inputs = ["A", "W"]
    if zero_point:
        inits.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zero_point"))
        inputs.append("a_zero_point")
    graph = helper.make_graph([helper.make_node("MatMulInteger", inputs, ["Y"])], "matmul_integer",
                              [helper.make_tensor_value_info("A", a_type, [None, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, N])], inits)
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
    signed, unsigned = session(TensorProto.INT8, False), session(TensorProto.UINT8, True)
    rows = []
    for m in (1, 256):
        codes = rng.integers(-127, 128, (m, K)).astype(np.int8)
        shifted = (codes.astype(np.int16) + 128).astype(np.uint8)
        same = np.array_equal(signed.run(None, {"A": codes})[0], unsigned.run(None, {"A": shifted})[0])
        repeats = 200 if m == 1 else 20
        rows.append({"rows": m, "int8_x_int8_ms": median_ms(signed, codes, repeats),
                     "uint8_x_int8_ms": median_ms(unsigned, shifted, repeats), "identical_outputs": same})
    print("| rows | int8 x int8 ms | uint8 x int8 ms (zero point 128) | ratio | identical |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']} | {r['int8_x_int8_ms']:.3f} | {r['uint8_x_int8_ms']:.3f} | "
              f"{r['int8_x_int8_ms'] / r['uint8_x_int8_ms']:.1f}x | {r['identical_outputs']} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"onnxruntime": ort.__version__, "k": K, "n": N, "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
