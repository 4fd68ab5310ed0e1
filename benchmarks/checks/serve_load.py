"""Load test for `optimize serve`: N concurrent chat clients against a server this script starts.

    .venv/bin/python -m benchmarks.checks.serve_load artifacts/smollm2-int4-gptq [--concurrency 1,4,8,16]
        [--prompt-tokens 64,128,256] [--output-tokens 64,128,256] [--duration 30] [--slots 8]
        [--out artifacts/serve-load]

Each client is a user in a closed loop: it sends a streamed, greedy chat request, waits for the
whole answer, and sends the next. It cycles through one request per (prompt, output) length pair:
prompts of 64/128/256 tokens cut from WikiText-2 test (plus the chat template), 64/128/256 output
tokens (`ignore_eos`), so every level has the same mix. A level's clients start spread over --ramp
seconds and stop sending --duration seconds later; throughput counts the tokens streamed in that
window, latencies (TTFT to the first streamed text, TPOT the mean gap after it, ITL every gap between
two streamed pieces) the requests sent in it. The server's RSS is sampled throughout. Prints a table; writes serve_load.json and serve_load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import time
from pathlib import Path

import httpx
import numpy as np

from calibration.datasets import load_text
from runtime import find_model_folder
from runtime.serve.launch import serve_process
from runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def make_requests(
    folder: Path,
    clients: int,
    prompt_tokens: list[int],
    output_tokens: list[int],
    seed: int = 0,
    text: str = "wikitext-2",
) -> list[list[dict]]:
    """For each client, one chat request per (prompt, output) length pair, in an order rotated by the
    client's index; prompts are cut from the evaluation text at random places."""
    tokenizer = Tokenizer(folder)
    ids = tokenizer.encode(load_text(text, "test"), add_special_tokens=False)
    rng = random.Random(seed)
    pairs = [(p, o) for o in output_tokens for p in prompt_tokens]
    per_client = []
    for i in range(clients):
        bodies = []
        for length, new in pairs[i % len(pairs) :] + pairs[: i % len(pairs)]:
            start = rng.randrange(0, len(ids) - length)
            text = tokenizer.decode(ids[start : start + length])
            bodies.append(
                {
                    "messages": [{"role": "user", "content": f"Continue this text:\n\n{text}"}],
                    "max_tokens": new,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            )
        per_client.append(bodies)
    return per_client


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    started = time.perf_counter()
    first = last = None
    tokens, times = 0, []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                    times.append(last)
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if first is None:
        return {"error": "no text streamed"}
    return {
        "ttft": first - started,
        "tpot": (last - first) / max(tokens - 1, 1),
        "tokens": tokens,
        "seconds": last - started,
        "started": started,
        "times": times,
    }


async def level(url: str, bodies: list[list[dict]], concurrency: int, duration_s: float, ramp_s: float = 0.0) -> dict:
    """`concurrency` clients, client i cycling through bodies[i] and starting at i * ramp_s / concurrency
    (users do not all press enter in the same millisecond). Clients stop sending `duration_s` after
    the last one started; throughput counts the tokens streamed in that window (ramp and drain excluded),
    latencies come from the requests sent in it."""
    results: list[dict] = []
    window_start = time.perf_counter() + ramp_s * (concurrency - 1) / concurrency
    window_end = window_start + duration_s

    async def client_loop(client, i):
        await asyncio.sleep(i * ramp_s / concurrency)
        for n in itertools.count():
            if time.perf_counter() >= window_end:
                break
            results.append(await one(client, url, bodies[i][n % len(bodies[i])]))

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(concurrency)))
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    in_window = [r for r in ok if window_start <= r["started"] < window_end]
    streamed = sum(r["tokens"] * sum(window_start <= t < window_end for t in r["times"]) / len(r["times"]) for r in ok)

    def pct(key, q):
        return float(np.percentile([r[key] for r in in_window], q)) if in_window else float("nan")

    # inter-token latency: every gap between two streamed pieces, where a prefill stalling the batch shows
    gaps = [b - a for r in in_window for a, b in zip(r["times"], r["times"][1:])] or [float("nan")]

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "window_s": duration_s,
        "requests_per_s": sum(window_start <= r["times"][-1] < window_end for r in ok) / duration_s,
        "output_tokens_per_s": streamed / duration_s,
        **{f"ttft_p{q}_ms": pct("ttft", q) * 1000 for q in (50, 95, 99)},
        **{f"tpot_p{q}_ms": pct("tpot", q) * 1000 for q in (50, 95, 99)},
        **{f"itl_p{q}_ms": float(np.percentile(gaps, q)) * 1000 for q in (50, 99)},
        "itl_max_ms": max(gaps) * 1000,
    }


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample_rss(pid: int, samples: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append((time.perf_counter(), rss_mb(pid)))
        await asyncio.sleep(0.25)


async def run_all(url: str, pid: int, bodies: list[list[dict]], args) -> tuple[list[dict], dict]:
    stop, samples = asyncio.Event(), []
    sampler = asyncio.create_task(sample_rss(pid, samples, stop))
    await level(url, bodies, args.slots, 1.0)  # every batch size the server will run, once
    warm_rss = rss_mb(pid)
    rows = []
    for c in args.concurrency:
        before = len(samples)
        row = await level(url, bodies, c, args.duration, args.ramp)
        row["rss_max_mb"] = max(s[1] for s in samples[before:] or [(0, rss_mb(pid))])
        rows.append(row)
        print_row(row)
    stop.set()
    await sampler
    memory = {"after_warmup_mb": warm_rss, "end_mb": rss_mb(pid), "max_mb": max(s[1] for s in samples)}
    return rows, memory


HEADER = (
    "clients",
    "reqs",
    "err",
    "req/s",
    "out tok/s",
    "TTFT p50/p95/p99 ms",
    "TPOT p50/p95/p99 ms",
    "ITL p50/p99/max ms",
    "RSS max MiB",
)


def print_row(r: dict) -> None:
    ttft = "/".join(f"{r.get(f'ttft_p{q}_ms', 0):.0f}" for q in (50, 95, 99))
    tpot = "/".join(f"{r.get(f'tpot_p{q}_ms', 0):.1f}" for q in (50, 95, 99))
    itl = "/".join(f"{r.get(key, 0):.0f}" for key in ("itl_p50_ms", "itl_p99_ms", "itl_max_ms"))
    print(
        f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
        f"{r['output_tokens_per_s']:.1f} | {ttft} | {tpot} | {itl} | {r['rss_max_mb']:.0f} |",
        flush=True,
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c, [r["output_tokens_per_s"] for r in rows], "o-")
    a.set(xlabel="concurrent clients", ylabel="output tokens/s", title="throughput")
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p95_ms", "o--"), ("tpot_p50_ms", "s-"), ("tpot_p95_ms", "s--")):
        b.plot(c, [r.get(key) for r in rows], style, label=key.replace("_ms", ""))
    b.set(xlabel="concurrent clients", ylabel="ms", yscale="log", title="latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--concurrency", default="1,4,8,16", type=ints)
    p.add_argument("--duration", type=float, default=30, help="seconds each level sends requests (after the ramp)")
    p.add_argument("--prompt-tokens", default="64,128,256", type=ints, help="prompt lengths of the mix")
    p.add_argument("--output-tokens", default="64,128,256", type=ints, help="output lengths of the mix")
    p.add_argument("--ramp", type=float, default=1.0, help="seconds over which a level's clients start")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--text", default="wikitext-2", help="where prompts are cut from: a built-in name or a text file")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--serve-args", default=[], type=str.split, help="more `optimize serve` options, quoted")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "serve-load")
    args = p.parse_args()
    folder = find_model_folder(args.artifact)
    # enough clients for the largest level and for the warm-up, which runs one per slot
    bodies = make_requests(
        folder, max(*args.concurrency, args.slots), args.prompt_tokens, args.output_tokens, text=args.text
    )
    model = folder.parent.name if (folder.parent / "run.json").is_file() else folder.name
    for body in (b for client in bodies for b in client):
        body["model"] = model
    serve_args = [
        "--slots",
        str(args.slots),
        "--max-length",
        "1024",
        "--threads",
        str(args.threads),
        "--log-level",
        "warning",
        *args.serve_args,
    ]
    print(f"serving {folder} ({args.slots} slots); {args.duration:.0f} s per level\n")
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    with serve_process(folder, *serve_args) as (url, proc):
        rows, memory = asyncio.run(run_all(url, proc.pid, bodies, args))
    one_client = next((r for r in rows if r["concurrency"] == 1), None)
    eight = next((r for r in rows if r["concurrency"] == 8), None)
    targets = {}
    if one_client and eight:
        targets = {
            "throughput_8_over_1": eight["output_tokens_per_s"] / one_client["output_tokens_per_s"],
            "ttft_p95_8_over_p50_1": eight["ttft_p95_ms"] / one_client["ttft_p50_ms"],
        }
    total_errors = sum(r["errors"] for r in rows)
    print(
        f"\nmemory: {memory['after_warmup_mb']:.0f} MiB after warm-up, {memory['end_mb']:.0f} at the end, "
        f"{memory['max_mb']:.0f} max; errors: {total_errors}"
    )
    for key, value in targets.items():
        print(f"{key}: {value:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "artifact": str(folder),
        "slots": args.slots,
        "duration_s": args.duration,
        "ramp_s": args.ramp,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "rows": rows,
        "memory": memory,
        "targets": targets,
        "errors": total_errors,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    }
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2))
    plot(rows, args.out / "serve_load.png")
    print(f"wrote {args.out}/serve_load.json and serve_load.png")


if __name__ == "__main__":
    main()
