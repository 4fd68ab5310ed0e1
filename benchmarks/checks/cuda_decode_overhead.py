"""Where a CUDA decode step's time goes, and what each runner setting buys (GPU machine):
`python -m benchmarks.checks.cuda_decode_overhead RUN [--out DIR]`.

In one process, on the same prompt, batch 1 and 8, 128 decode steps, median of 3:
  plain            decode launched kernel by kernel, after the profiled placement probe (the default
                   before CUDA graphs became the default on CUDA)
  plain, no probe  the same session opened without profiling (`verify_placement=False`)
  plain, 1 thread  one intra-op thread
  CUDA graph       the decode step captured once and replayed (the default on CUDA)
  … argmax on the device   greedy tokens picked by an ArgMax on the GPU (what `generate` does when
                   every row is greedy) instead of copying the logits to the host and taking numpy's argmax
Then one profiled plain session over 16 decode steps: ONNX Runtime's node events give the host-side
time per op type and step (on CUDA a node's time is its launch cost; kernels run asynchronously) and
the whole `model_run`, so the launch overhead can be told from the GPU's own time. The same for the
prefill (time to first token): wall time and time inside session.run for 128- and 1024-token
prompts, and a profiled prefill of each.
Prints tables and writes cuda_decode_overhead.json into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from runtime import Generator, find_model_folder
from runtime.fused import FusedGraph
from runtime.session import create_session

PROMPT = "Explain in two sentences why the sky is blue. " * 12  # about 128 tokens
STEPS = 128
VARIANTS = {
    "plain": dict(cuda_graph=False),
    "plain, no probe": dict(cuda_graph=False, verify_placement=False),
    "plain, 1 thread": dict(cuda_graph=False, threads=1),
    "plain, argmax on the device": dict(cuda_graph=False, device_argmax=True),
    "CUDA graph": dict(cuda_graph=True),
    "CUDA graph, argmax on the device": dict(cuda_graph=True, device_argmax=True),
}


def time_decode(gen: Generator, prompt: list[int], batch: int, device_argmax: bool = False, repeats: int = 3) -> dict:
    """ms per decode step and the share of it inside session.run (the device argmax's run included),
    greedy, median of `repeats`."""
    per_step, inside = [], []
    for _ in range(repeats):
        logits, state = gen.prefill([prompt] * batch, STEPS + 2)

        def step(tokens):
            return gen.decode(tokens, state, greedy=True) if device_argmax else gen.decode(tokens, state).argmax(-1)

        tokens = step(logits.argmax(-1))  # a CUDA graph is captured here
        before = gen.graph.session_seconds
        started = time.perf_counter()
        for _ in range(STEPS):
            tokens = step(tokens)
        seconds = time.perf_counter() - started
        per_step.append(seconds / STEPS * 1000)
        inside.append((gen.graph.session_seconds - before) / seconds)
    return {
        "ms_per_step": statistics.median(per_step),
        "tok_s": batch * 1000 / statistics.median(per_step),
        "inside_run": statistics.median(inside),
    }


def profile_plain(folder: Path, prompt: list[int], steps: int = 16) -> dict:
    """Host-side µs per decode step by op type, from ONNX Runtime's profile of a plain session."""
    gen = Generator(folder, provider="cuda", cuda_graph=False, verify_placement=False)
    session, _ = create_session(folder / "fused", gen.contract, "cuda", profile_placement=True)
    return profile_decode(FusedGraph(session, gen.contract, gen.pad_id, "cuda"), prompt, steps)


def profile_decode(graph: FusedGraph, prompt: list[int], steps: int) -> dict:
    """Decode `steps` tokens on a session opened with profiling; summarize its node events."""
    logits, state = graph.prefill([prompt], steps + 8)
    tokens = logits.argmax(-1)
    for _ in range(4 + steps):
        tokens = graph.decode(tokens, state).argmax(-1)
    events = json.loads(Path(graph.session.end_profiling()).read_text())
    return summarize(events, [e for e in events if e.get("name") == "model_run"][-steps:])


def time_prefill(gen: Generator, prompt: list[int], repeats: int = 5) -> dict:
    """Wall ms of a prefill (what the bench's time to first token measures) and ms inside session.run."""
    walls, inside = [], []
    for i in range(2 + repeats):
        before, started = gen.graph.session_seconds, time.perf_counter()
        gen.prefill([prompt], 8)
        if i >= 2:
            walls.append((time.perf_counter() - started) * 1000)
            inside.append((gen.graph.session_seconds - before) * 1000)
    return {"wall_ms": statistics.median(walls), "session_run_ms": statistics.median(inside)}


def profile_prefill(folder: Path, prompt: list[int]) -> dict:
    """Host-side µs by op type of one prefill of `prompt`, from a profiled plain session (after 3 warm-ups)."""
    gen = Generator(folder, provider="cuda", cuda_graph=False, verify_placement=False)
    session, _ = create_session(folder / "fused", gen.contract, "cuda", profile_placement=True)
    graph = FusedGraph(session, gen.contract, gen.pad_id, "cuda")
    for _ in range(4):
        graph.prefill([prompt], 8)
    events = json.loads(Path(session.end_profiling()).read_text())
    return summarize(events, [e for e in events if e.get("name") == "model_run"][-1:])


def summarize(events: list[dict], runs: list[dict]) -> dict:
    """Per op type: nodes and host µs per run, over the node events inside `runs`; their mean model_run µs."""
    steps = len(runs)
    start, end = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    by_op: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= end:
            by_op[e["args"]["op_name"]][0] += 1
            by_op[e["args"]["op_name"]][1] += e["dur"]
    return {
        "model_run_us": statistics.mean(r["dur"] for r in runs),
        "ops": {
            op: {"nodes_per_step": n / steps, "us_per_step": us / steps}
            for op, (n, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="a run folder or export step with a fused graph")
    parser.add_argument("--out", type=Path, default=Path("cuda-decode-overhead"))
    parser.add_argument(
        "--provider",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a smoke test of the script (no CUDA graph, no profile)",
    )
    args = parser.parse_args()
    import onnxruntime as ort

    folder = find_model_folder(args.artifact)
    report: dict = {"artifact": str(folder), "onnxruntime": ort.__version__, "steps": STEPS, "variants": {}}
    prompt: list[int] = []
    for name, options in VARIANTS.items():
        if args.provider == "cpu" and options.get("cuda_graph"):
            continue
        options = dict(options)
        device_argmax = options.pop("device_argmax", False)
        gen = Generator(folder, provider=args.provider, **options)
        prompt = prompt or gen.tokenizer.encode(PROMPT)[:128]
        report["variants"][name] = {f"batch {b}": time_decode(gen, prompt, b, device_argmax) for b in (1, 8)}
        del gen
    report["profile"] = profile_plain(folder, prompt) if args.provider == "cuda" else None
    gen = Generator(folder, provider=args.provider)
    long_prompt = (prompt * 9)[:1024]
    report["prefill"] = {f"{len(p)} tokens": time_prefill(gen, p) for p in (prompt, long_prompt)}
    del gen
    if args.provider == "cuda":
        for p in (prompt, long_prompt):
            report["prefill"][f"{len(p)} tokens"]["profile"] = profile_prefill(folder, p)

    print(
        "| variant | b1 ms/step | b1 tok/s | b1 inside run | b8 ms/step | b8 tok/s | b8 inside run |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name, rows in report["variants"].items():
        one, eight = rows["batch 1"], rows["batch 8"]
        print(
            f"| {name} | {one['ms_per_step']:.2f} | {one['tok_s']:.1f} | {one['inside_run']:.0%} | "
            f"{eight['ms_per_step']:.2f} | {eight['tok_s']:.1f} | {eight['inside_run']:.0%} |"
        )
    profile = report["profile"] or {"model_run_us": float("nan"), "ops": {}}
    print(f"profiled plain decode: model_run {profile['model_run_us']:.0f} µs/step; host time by op:")
    for op, row in list(profile["ops"].items())[:10]:
        print(
            f"  {op:32s} {row['nodes_per_step']:5.0f} nodes {row['us_per_step']:8.0f} µs "
            f"({row['us_per_step'] / max(row['nodes_per_step'], 1):.1f} µs/node)"
        )
    for name, row in report["prefill"].items():
        print(f"prefill {name}: {row['wall_ms']:.2f} ms wall, {row['session_run_ms']:.2f} ms in session.run")
        if "profile" in row:
            top = list(row["profile"]["ops"].items())[:6]
            print(
                f"  profiled: model_run {row['profile']['model_run_us']:.0f} µs; "
                + ", ".join(f"{op} {r['us_per_step']:.0f} µs" for op, r in top)
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_decode_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
