"""The server's scheduler without HTTP: where the time goes at 1 and 8 clients, and what bounds the ratio.

    .venv/bin/python -m benchmarks.experiments.serve_engine artifacts/smollm2-int4-rtn [--concurrency 1,8] [--duration 25]

The same closed-loop clients and request mix as serve_load.py (its `make_requests`), submitted
straight to the `Scheduler` of an `optimize serve` server built in this process: no HTTP, no
event loop, no client process on the same cores. The slots' prefill (`extend`) and decode calls are
timed. For each level it reports output tokens/s, the share of time in prefills, ms per decode step
and rows per step, and "decode only": rows per step over ms per step, the throughput if prefills
cost nothing. The ratio of the 8- and 1-client decode-only figures bounds what any scheduling can
reach on this machine with these kernels.

Prints a table; writes benchmarks/results/serve-load/serve_engine.json (or --out).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import threading
import time
from pathlib import Path

from benchmarks.checks.serve_load import make_requests
from runtime import Generator, find_model_folder
from runtime.serve import protocol
from runtime.serve.app import Server, Settings
from runtime.serve.engine import Request

ROOT = Path(__file__).resolve().parents[2]


class Timed:
    """Wraps the slots' extend and decode with timers and counters."""

    def __init__(self, slots):
        self.slots, self.seconds, self.counts = slots, collections.Counter(), collections.Counter()
        extend, decode = slots.extend, slots.decode

        def timed_extend(row, prompt, count):
            started = time.perf_counter()
            out = extend(row, prompt, count)
            self.seconds["prefill"] += time.perf_counter() - started
            self.counts["prefill_tokens"] += count
            return out

        def timed_decode(tokens):
            started = time.perf_counter()
            out = decode(tokens)
            self.seconds["decode"] += time.perf_counter() - started
            self.counts["steps"] += 1
            self.counts["rows"] += len(tokens)
            return out

        slots.extend, slots.decode = timed_extend, timed_decode


def run_level(server: Server, timed: Timed, bodies: list[list[dict]], clients: int, duration: float) -> dict:
    """`clients` closed loops for `duration` seconds; counts what happens inside that window."""
    scheduler, tokenizer, name = server.scheduler, server.generator.tokenizer, server.settings.model_name
    produced, errors, stopping, finished = [0], [], threading.Event(), threading.Semaphore(0)

    def send(loop):
        job = protocol.parse("chat", dict(next(loop), model=name), name, server.settings.max_length, tokenizer)

        def emit(event):  # on the scheduler thread: the client's next request goes in at once
            if event.kind == "text":
                return
            if event.kind == "error":
                errors.append(event.message)
            if stopping.is_set():
                finished.release()
            else:
                send(loop)

        scheduler.submit(
            Request(protocol.new_id("chat"), job.prompt, job.max_tokens, job.params, emit, job.stop, job.ignore_eos)
        )

    class Count:
        def finished(self, request):
            pass

        def step(self, new_tokens):
            produced[0] += new_tokens

    scheduler.observer = Count()
    for client in range(clients):
        send(itertools.cycle(bodies[client]))
    time.sleep(2.0)  # let every client's first prompt in before the window opens
    tokens0, seconds0, counts0 = produced[0], timed.seconds.copy(), timed.counts.copy()
    started = time.perf_counter()
    time.sleep(duration)
    elapsed = time.perf_counter() - started
    tokens, seconds, counts = produced[0] - tokens0, timed.seconds - seconds0, timed.counts - counts0
    stopping.set()
    for _ in range(clients):
        finished.acquire(timeout=300)
    steps = max(counts["steps"], 1)
    decode_ms = 1000 * seconds["decode"] / steps
    rows = counts["rows"] / steps
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "errors": len(errors),
        "output_tokens_per_s": round(tokens / elapsed, 1),
        "prefill_share": round(seconds["prefill"] / elapsed, 3),
        "prefill_tokens_per_s": round(counts["prefill_tokens"] / max(seconds["prefill"], 1e-9), 1),
        "decode_share": round(seconds["decode"] / elapsed, 3),
        "decode_steps": counts["steps"],
        "rows_per_step": round(rows, 2),
        "decode_ms_per_step": round(decode_ms, 2),
        "decode_only_tokens_per_s": round(1000 * rows / decode_ms, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--duration", type=float, default=25)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--text", default="wikitext-2")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve-load" / "serve_engine.json")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    folder = find_model_folder(args.artifact)
    gen = Generator(folder, provider="cpu", graph="fused")
    server = Server(gen, Settings(args.slots, 1024, 64, 512, "model", True))  # serve_load.py's server settings
    server.warm_up()
    timed = Timed(server.slots)
    bodies = make_requests(folder, max(*levels, args.slots), [64, 128, 256], [64, 128, 256], text=args.text)
    server.scheduler.start()
    rows = []
    print("| clients | output tok/s | prefill share | prefill tok/s | decode ms/step | rows/step | decode only tok/s |")
    print("|---|---|---|---|---|---|---|")
    for clients in levels:
        r = run_level(server, timed, bodies, clients, args.duration)
        rows.append(r)
        print(
            f"| {clients} | {r['output_tokens_per_s']} | {r['prefill_share']:.0%} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['decode_ms_per_step']} | {r['rows_per_step']} | {r['decode_only_tokens_per_s']} |",
            flush=True,
        )
    server.scheduler.stop()
    ratios = {}
    if 1 in levels and 8 in levels:
        one, eight = rows[levels.index(1)], rows[levels.index(8)]
        ratios = {
            "output_8_over_1": round(eight["output_tokens_per_s"] / one["output_tokens_per_s"], 2),
            "decode_only_8_over_1": round(eight["decode_only_tokens_per_s"] / one["decode_only_tokens_per_s"], 2),
        }
        print(
            f"\n8 over 1 client: {ratios['output_8_over_1']}x; if prefills cost nothing: {ratios['decode_only_8_over_1']}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {"artifact": str(folder), "slots": args.slots, "duration_s": args.duration, "rows": rows, "ratios": ratios},
            indent=2,
        )
        + "\n"
    )
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
