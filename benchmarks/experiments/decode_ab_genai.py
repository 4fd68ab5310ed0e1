"""Our fused graph against onnxruntime-genai's graph, decode step for decode step, outside both loops.

    .venv/bin/python -m benchmarks.experiments.decode_ab_genai artifacts/smollm2-int4-rtn GENAI_MODEL_DIR [--batch 8] [--rounds 8]

`optimize bench --compare` times each engine through its own generation loop, one engine after the
other. This script separates the graphs from the loops: both graphs run in plain onnxruntime sessions
(2 threads) with the KV cache bound in place, 128-token prompts, then `--steps` timed decode steps
at `--batch`, and the two alternate for `--rounds` so that a machine which slows down mid-run
affects both. GENAI_MODEL_DIR is the folder the bench built with genai's model builder
(`<run>/bench/peers/genai-int4-…`). Prints the ms per step of each round and the medians; writes
benchmarks/results/kernels/decode_ab_genai_b<batch>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.experiments.cpu_decode_profile import PROMPT, THREADS, cpu_session, decode_steps, prompts
from runtime import find_model_folder
from runtime.io_spec import Contract

RESULTS = Path(__file__).resolve().parents[1] / "results" / "kernels"


def genai(s: ort.InferenceSession, batch: int, steps: int) -> float:
    """genai's graph as genai runs it on the CPU: past and present share one buffer of max_length positions."""
    layers = sum(1 for i in s.get_inputs() if i.name.endswith(".key"))
    kv_heads, head_dim = s.get_inputs()[2].shape[1], s.get_inputs()[2].shape[3]
    buffers = [np.zeros((batch, kv_heads, PROMPT + steps + 16, head_dim), np.float32) for _ in range(2 * layers)]
    binding = s.io_binding()
    for i in range(layers):
        for j, kind in enumerate(("key", "value")):
            buf = buffers[2 * i + j]
            binding.bind_input(f"past_key_values.{i}.{kind}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            binding.bind_output(f"present.{i}.{kind}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)

    def run(ids: np.ndarray, total: int) -> None:
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((batch, total), np.int64))
        binding.bind_output("logits", "cpu")
        s.run_with_iobinding(binding)

    total = PROMPT
    run(np.array(prompts(batch), dtype=np.int64), total)
    token = np.full((batch, 1), 5, np.int64)
    for _ in range(10):
        total += 1
        run(token, total)
    started = time.perf_counter()
    for _ in range(steps):
        total += 1
        run(token, total)
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("genai_dir", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    fused = find_model_folder(args.artifact) / "fused"
    contract = Contract.load(fused)
    sessions = {"ours": cpu_session(fused / contract.model_file), "genai": cpu_session(args.genai_dir / "model.onnx")}
    runs = {
        "ours": lambda: decode_steps(sessions["ours"], contract, args.batch, args.steps),
        "genai": lambda: genai(sessions["genai"], args.batch, args.steps),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for turn in range(args.rounds):
        for name in runs if turn % 2 == 0 else reversed(runs):
            times[name].append(runs[name]())
    print(
        f"batch {args.batch}, {args.steps} decode steps after a {PROMPT}-token prompt, {THREADS} threads, ms per step:"
    )
    for name, values in times.items():
        print(f"  {name:5s} median {statistics.median(values):6.2f}   rounds " + " ".join(f"{v:.2f}" for v in values))
    out = RESULTS / f"decode_ab_genai_b{args.batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "artifact": str(args.artifact),
                "genai_dir": str(args.genai_dir),
                "batch": args.batch,
                "steps": args.steps,
                "ms_per_step": times,
                "median": {k: statistics.median(v) for k, v in times.items()},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
