"""Prompts with an int8 KV cache: the float-cache twin graph against the int8 kernel, in one process.

    .venv/bin/python -m benchmarks.experiments.kv_int8_prefill INT8_ARTIFACT [FLOAT_ARTIFACT] [--lengths 128,512,1024] [--rounds 5]

INT8_ARTIFACT is a run exported with `kv_cache: int8` (for example `optimize recipes/smollm2-int4-rtn.yaml
--set name=smollm2-int4-rtn-kv8 --set export.kv_cache=int8`), FLOAT_ARTIFACT the same recipe with the
float cache. For each prompt length (consecutive slices of WikiText-2 test), batch 1, the script times
the prefill (time to first token's logits) of
  - `float prefill`: the runner as shipped, the prompt through the float-cache graph, then its keys and
    values rounded into the int8 cache (runtime.float_prefill);
  - `int8 kernel`: the same session and cache, the prompt through the int8 graph itself;
  - `float cache`: FLOAT_ARTIFACT's runner, for reference;
alternating them for `--rounds` rounds (median). It also reports the resident memory the second session
adds, and how far the first token's logits of the two int8 paths are apart. Prints a table and writes
benchmarks/results/kv-int8/prefill_ab.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.bench.system import machine, rss_bytes
from pipeline.bench.workload import make_workload
from runtime import Generator, find_model_folder
from runtime.fused import FusedGraph
from runtime.session import create_session

RESULTS = Path(__file__).resolve().parents[1] / "results" / "kv-int8"


def timed(graph: FusedGraph, prompt: list[int]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    logits, _ = graph.prefill([prompt])
    return 1000 * (time.perf_counter() - started), logits[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("int8_artifact")
    ap.add_argument("float_artifact", nargs="?")
    ap.add_argument("--lengths", default="128,512,1024")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    gen = Generator(find_model_folder(args.int8_artifact), provider="cpu", graph="fused", threads=args.threads)
    if gen.float_prefill is None:
        sys.exit(f"{args.int8_artifact}: no float prefill graph (an int8 cache exported by this version is needed)")
    before = rss_bytes()  # a third session, as the runner's second one: the memory it adds
    extra, _ = create_session(
        find_model_folder(args.int8_artifact) / "fused",
        gen.contract,
        "cpu",
        args.threads,
        optimization=gen.settings.optimization,
        model_file=gen.contract.prefill_model_file,
    )
    added_mib = (rss_bytes() - before) / 2**20
    del extra
    graphs = {"float prefill": gen.graph, "int8 kernel": FusedGraph(gen.session, gen.contract, gen.pad_id)}
    if args.float_artifact:
        graphs["float cache"] = Generator(
            find_model_folder(args.float_artifact), provider="cpu", graph="fused", threads=args.threads
        ).graph
    work = make_workload(gen.tokenizer)

    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in lengths} for name in graphs}
    apart: dict[int, float] = {}
    for n in lengths:
        prompt = work.prompt(n)
        for graph in graphs.values():
            timed(graph, prompt)  # warm-up: ONNX Runtime sizes its buffers for this length
        for turn in range(args.rounds):
            order = list(graphs.items()) if turn % 2 == 0 else list(reversed(graphs.items()))
            logits = {}
            for name, graph in order:
                ms, logits[name] = timed(graph, prompt)
                times[name][n].append(ms)
        apart[n] = float(np.abs(logits["float prefill"] - logits["int8 kernel"]).max())

    median = {name: {n: statistics.median(v) for n, v in by_len.items()} for name, by_len in times.items()}
    print(
        f"\nprefill of one prompt, ms (median of {args.rounds} alternated rounds); "
        f"the float prefill session adds {added_mib:.0f} MiB resident"
    )
    print("| prompt tokens | " + " | ".join(graphs) + " | max |logit difference| float prefill vs int8 kernel |")
    print("|---" * (len(graphs) + 2) + "|")
    for n in lengths:
        print(f"| {n} | " + " | ".join(f"{median[name][n]:.1f}" for name in graphs) + f" | {apart[n]:.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "prefill_ab.json"
    out.write_text(
        json.dumps(
            {
                "int8_artifact": args.int8_artifact,
                "float_artifact": args.float_artifact,
                "rounds": args.rounds,
                "median_ms": median,
                "all_ms": times,
                "logits_max_abs_diff": apart,
                "prefill_session_rss_mib": added_mib,
                "machine": machine(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
