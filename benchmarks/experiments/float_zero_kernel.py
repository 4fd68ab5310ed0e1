"""What float zero points cost one MatMulNBits on ONNX Runtime's CPU provider, and what our CPU form costs.

    .venv/bin/python -m benchmarks.experiments.float_zero_kernel

One INT4 g32 matmul of a SmolLM2 gate/up shape (K 576, N 1536), 30 of them chained with distinct
weights (as a 30-layer model streams them), 2 threads, at 1 and 8 rows, with float compute
(`accuracy_level` 0) and int8 compute (4). Three forms of the same asymmetric weights: integer zero
points; float zero points as MatMulNBits takes them; and float zero points as the export writes them
(`pipeline.graph.float_zero`: integer MatMulNBits plus a block-sum correction). Prints a Markdown table
and writes benchmarks/results/float-zero/kernel.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.graph.float_zero import lower_float_zero_points
from pipeline.quant.primitives import QuantScheme, pack_matmul_nbits, quantize

K, N, GROUP, CHAIN = 576, 1536, 32, 30
OUT = Path(__file__).resolve().parents[1] / "results" / "float-zero" / "kernel.json"


def chain(float_zero: bool, accuracy_level: int) -> onnx.ModelProto:
    """CHAIN matmuls x @ W_i for i in 1..CHAIN, summed, so every weight is read each run."""
    torch.manual_seed(0)
    nodes, inits, outputs = [], [], []
    for i in range(CHAIN):
        packed = pack_matmul_nbits(quantize(torch.randn(N, K) * 0.05, QuantScheme(4, GROUP, False, float_zero)))
        names = [f"w{i}.{key}" for key in ("B", "scales", "zero_points")]
        inits += [
            numpy_helper.from_array(packed[key], name) for key, name in zip(("B", "scales", "zero_points"), names)
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["x", *names],
                [f"y{i}"],
                name=f"/m{i}/MatMulNBits",
                domain="com.microsoft",
                K=K,
                N=N,
                bits=4,
                block_size=GROUP,
                accuracy_level=accuracy_level,
            )
        )
        outputs.append(f"y{i}")
    nodes.append(helper.make_node("Sum", outputs, ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def time_us(model: onnx.ModelProto, rows: int, repeats: int = 30) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((rows, K)).astype(np.float32)
    session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) / CHAIN * 1e6


def main() -> None:
    rows = []
    for level in (0, 4):
        integer, native = chain(False, level), chain(True, level)
        lowered = chain(True, level)
        lower_float_zero_points(lowered)
        for m in (1, 8):
            rows.append(
                {
                    "accuracy_level": level,
                    "rows": m,
                    "integer_us": time_us(integer, m),
                    "float_native_us": time_us(native, m),
                    "float_lowered_us": time_us(lowered, m),
                }
            )
    print(f"One INT4 g32 MatMulNBits, K {K} x N {N}, µs per matmul (median, {CHAIN} chained, 2 threads)\n")
    print(
        "| accuracy_level | rows | integer zero points | float, as MatMulNBits takes them | float, our CPU form |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['accuracy_level']} | {r['rows']} | {r['integer_us']:.1f} | {r['float_native_us']:.1f} | {r['float_lowered_us']:.1f} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps({"onnxruntime": ort.__version__, "K": K, "N": N, "group": GROUP, "rows": rows}, indent=2) + "\n"
    )
    tmp.replace(OUT)
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
