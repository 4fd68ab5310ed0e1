"""Where a CPU decode step's time goes: ONNX Runtime's per-op profile of the fused graph, and what one
MatMulNBits costs as the batch grows.

    .venv/bin/python -m benchmarks.experiments.cpu_decode_profile artifacts/smollm2-int4-rtn [--batches 1,8] [--steps 100]

Part 1 runs decode steps of the artifact's fused graph at each batch size (128-token prompts, 2
threads), first plain for the step time, then under ONNX Runtime's profiler, and sums each op
type's kernel time over the measured steps only (prefill and warm-up excluded). The profiler adds
a few microseconds to every node, so read its figures as shares, not as the plain step time.

Part 2 times one MatMulNBits of a SmolLM2 gate/up shape (K 576, N 1536, INT4 g32 asymmetric) at
1 to 64 rows, with int8 compute (`accuracy_level` 4, what the INT4 recipes ship) and float compute
(0), against a float32 MatMul. Each graph chains 30 such matmuls with distinct weights, as a
30-layer model reads them, so the weights stream from memory rather than sit in cache.

Part 3 puts the fused graph's own MatMulNBits nodes (the step's weights, its attributes) in a graph
of their own, each fed a [batch, 1, K] input, and times it against the whole decode step, the two
alternated over --rounds rounds without the profiler: what the step would cost if every other op
(attention, norms, activation, the executor) were free. Engines running ONNX Runtime's kernels
(onnxruntime-genai too) can differ by little more than that.

Prints Markdown tables and writes benchmarks/results/kernels/cpu_decode_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from runtime import find_model_folder
from runtime.fused import FusedGraph
from runtime.io_spec import Contract

OUT = Path(__file__).resolve().parents[1] / "results" / "kernels" / "cpu_decode_profile.json"
THREADS = 2
PROMPT = 128
K, N, BLOCK, CHAIN = 576, 1536, 32, 30


def cpu_session(model: Path | bytes, profile: bool = False) -> ort.InferenceSession:
    """A CPU session on THREADS threads, from a model file or serialized bytes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"cpu-decode-profile-{os.getpid()}")
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
    )


def prompts(batch: int) -> list[list[int]]:
    """`batch` made-up prompts of PROMPT tokens (speed does not depend on the ids)."""
    return [list(range(100 + row, 100 + row + PROMPT)) for row in range(batch)]


def decode_steps(session: ort.InferenceSession, contract: Contract, batch: int, steps: int) -> float:
    """Prefill `prompts(batch)`, 10 warm-up steps, then `steps` timed decode steps; returns ms per step."""
    graph = FusedGraph(session, contract, pad_id=0)
    _, state = graph.prefill(prompts(batch), room=steps + 16)
    tokens = np.full(batch, 5)
    for _ in range(10):
        graph.decode(tokens, state)
    started = time.perf_counter()
    for _ in range(steps):
        graph.decode(tokens, state)
    return (time.perf_counter() - started) / steps * 1e3


def profile_decode(folder: Path, batch: int, steps: int) -> dict:
    contract = Contract.load(folder / "fused")
    path = folder / "fused" / contract.model_file
    plain_ms = decode_steps(cpu_session(path, False), contract, batch, steps)
    session = cpu_session(path, True)
    profiled_ms = decode_steps(session, contract, batch, steps)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    start = runs[-steps]  # the first timed decode step: after the prefill and the warm-up
    per_op, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    total = sum(per_op.values())
    return {
        "batch": batch,
        "context": PROMPT + 10 + steps // 2,
        "plain_ms_per_step": round(plain_ms, 3),
        "profiled_ms_per_step": round(profiled_ms, 3),
        "ops": [
            {
                "op": op,
                "us_per_step": round(us / steps, 1),
                "share": round(us / total, 3),
                "nodes_per_step": nodes[op] // steps,
            }
            for op, us in per_op.most_common()
        ],
    }


def _chain(op: str, level: int | None, rng: np.random.Generator) -> ort.InferenceSession:
    nodes, inits = [], []
    for i in range(CHAIN):
        if op == "MatMulNBits":
            blocks = K // BLOCK
            inits += [
                numpy_helper.from_array(rng.integers(0, 256, (N, blocks, BLOCK // 2), dtype=np.uint8), f"B{i}"),
                numpy_helper.from_array((rng.random(N * blocks, dtype=np.float32) + 0.5) * 0.01, f"S{i}"),
                numpy_helper.from_array(rng.integers(0, 256, N * ((blocks + 1) // 2), dtype=np.uint8), f"Z{i}"),
            ]
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    ["X", f"B{i}", f"S{i}", f"Z{i}"],
                    [f"Y{i}"],
                    domain="com.microsoft",
                    K=K,
                    N=N,
                    bits=4,
                    block_size=BLOCK,
                    accuracy_level=level,
                )
            )
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal((K, N), dtype=np.float32), f"W{i}"))
            nodes.append(helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"]))
    nodes.append(helper.make_node("Sum", [f"Y{i}" for i in range(CHAIN)], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return cpu_session(model.SerializeToString())


def matmul_rows(rows: list[int], repeats: int = 20) -> list[dict]:
    rng = np.random.default_rng(0)
    kinds = {
        "int4 g32, int8 compute": _chain("MatMulNBits", 4, rng),
        "int4 g32, float compute": _chain("MatMulNBits", 0, rng),
        "float32 MatMul": _chain("MatMul", None, rng),
    }
    table = []
    for m in rows:
        x = rng.standard_normal((m, K), dtype=np.float32)
        row = {"rows": m}
        for kind, sess in kinds.items():
            for _ in range(5):
                sess.run(None, {"X": x})
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                sess.run(None, {"X": x})
                times.append(time.perf_counter() - started)
            row[kind] = round(statistics.median(times) / CHAIN * 1e6, 1)
        table.append(row)
    return table


def matmuls_alone(folder: Path, batch: int, steps: int, rounds: int) -> dict:
    """Median ms of a plain decode step against its MatMulNBits nodes alone (Part 3)."""
    contract = Contract.load(folder / "fused")
    model = onnx.load(str(folder / "fused" / contract.model_file))
    inits = {i.name: i for i in model.graph.initializer}
    nodes, outputs, used, widths = [], [], set(), set()
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
        copy = helper.make_node(
            "MatMulNBits",
            [f"a{attrs['K']}", *node.input[1:]],
            [f"{node.name}/Y"],
            name=node.name,
            domain="com.microsoft",
        )
        copy.attribute.extend(node.attribute)
        nodes.append(copy)
        outputs.append(helper.make_tensor_value_info(f"{node.name}/Y", TensorProto.FLOAT, [batch, 1, attrs["N"]]))
        used.update(node.input[1:])
        widths.add(attrs["K"])
    inputs = [helper.make_tensor_value_info(f"a{k}", TensorProto.FLOAT, [batch, 1, k]) for k in sorted(widths)]
    graph = helper.make_graph(nodes, "matmuls", inputs, outputs, [inits[u] for u in sorted(used) if u in inits])
    alone = cpu_session(
        helper.make_model(
            graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
        ).SerializeToString()
    )
    feeds = {f"a{k}": np.random.default_rng(k).standard_normal((batch, 1, k)).astype(np.float32) for k in widths}
    full = cpu_session(folder / "fused" / contract.model_file)

    def matmuls() -> float:
        for _ in range(5):
            alone.run(None, feeds)
        started = time.perf_counter()
        for _ in range(steps):
            alone.run(None, feeds)
        return (time.perf_counter() - started) / steps * 1000

    times: dict[str, list[float]] = {"step": [], "matmuls": []}
    for turn in range(rounds):
        order = [("step", lambda: decode_steps(full, contract, batch, steps)), ("matmuls", matmuls)]
        for name, run in order if turn % 2 == 0 else reversed(order):
            times[name].append(run())
    step, mm = statistics.median(times["step"]), statistics.median(times["matmuls"])
    return {
        "batch": batch,
        "matmulnbits_nodes": len(nodes),
        "step_ms": round(step, 3),
        "matmuls_alone_ms": round(mm, 3),
        "share": round(mm / step, 3),
        "step_over_matmuls": round(step / mm, 3),
        "rounds_ms": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a run folder or export folder with a fused graph")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rows", default="1,2,4,8,16,64")
    parser.add_argument("--rounds", type=int, default=6, help="Part 3: alternated rounds of step and matmuls alone")
    args = parser.parse_args()
    folder = find_model_folder(args.artifact)
    if not (folder / "fused").is_dir():
        raise SystemExit(f"{folder}: no fused/ graph; export with fused: true")
    profiles = [profile_decode(folder, int(b), args.steps) for b in args.batches.split(",")]
    for p in profiles:
        print(
            f"\nbatch {p['batch']}, about {p['context']} positions: {p['plain_ms_per_step']} ms per step "
            f"({p['profiled_ms_per_step']} under the profiler)\n"
        )
        print("| op | µs per step (profiled) | share | nodes per step |\n|---|---|---|---|")
        for op in p["ops"]:
            print(f"| {op['op']} | {op['us_per_step']} | {op['share']:.1%} | {op['nodes_per_step']} |")
    rows = matmul_rows([int(r) for r in args.rows.split(",")])
    kinds = [k for k in rows[0] if k != "rows"]
    print(f"\nOne matmul K {K} x N {N}, µs (median, {CHAIN} chained with distinct weights, {THREADS} threads)\n")
    print("| rows | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for r in rows:
        print(f"| {r['rows']} | " + " | ".join(str(r[k]) for k in kinds) + " |")
    alone = [matmuls_alone(folder, int(b), args.steps, args.rounds) for b in args.batches.split(",")]
    print(f"\nThe step's MatMulNBits alone against the whole step, ms (median of {args.rounds} alternated rounds)\n")
    print("| batch | whole step | MatMulNBits alone | share | step / matmuls |\n|---|---|---|---|---|")
    for a in alone:
        print(
            f"| {a['batch']} | {a['step_ms']} | {a['matmuls_alone_ms']} | {a['share']:.0%} | {a['step_over_matmuls']} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "artifact": str(folder),
        "threads": THREADS,
        "onnxruntime": ort.__version__,
        "decode_profiles": profiles,
        "matmul_rows": rows,
        "matmuls_alone": alone,
    }
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(OUT)
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
