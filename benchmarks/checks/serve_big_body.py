"""Does one client sending bodies at the size limit hold up the others? `optimize serve` against itself.

    .venv/bin/python -m benchmarks.checks.serve_big_body artifacts/smollm2-fp32 [--rounds 20] [--max-body-mb 2]

Two phases on one server: alone, then while a second client posts, back to back, chat bodies of
just under the size limit (one user message of that much text: parsed, templated and tokenized
before the context check refuses it). In each phase it times GET /health and the time to first
token of a small streamed greedy chat request. Prints a table; writes
benchmarks/results/serve-load/big_body.json with the machine, versions, commit and command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from runtime.serve.launch import serve_process

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "serve-load" / "big_body.json"
SMALL = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
    "stream": True,
}


def health_ms(url: str) -> float:
    started = time.perf_counter()
    httpx.get(f"{url}/health", timeout=30).raise_for_status()
    return (time.perf_counter() - started) * 1000


def ttft_ms(url: str, model: str) -> float:
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**SMALL, "model": model}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                return (time.perf_counter() - started) * 1000
    raise RuntimeError("no token streamed")


def measure(url: str, model: str, rounds: int) -> dict:
    health, ttft = [], []
    for _ in range(rounds):
        health.append(health_ms(url))
        ttft.append(ttft_ms(url, model))
    return {
        "health_ms_median": round(statistics.median(health), 1),
        "health_ms_max": round(max(health), 1),
        "ttft_ms_median": round(statistics.median(ttft), 1),
        "ttft_ms_max": round(max(ttft), 1),
    }


def flood(url: str, model: str, size: int, stop: threading.Event, replies: list[int]) -> None:
    """Post bodies of about `size` bytes back to back until `stop`."""
    text = ("All work and no play makes Jack a dull boy. " * (size // 44 + 1))[: size - 200]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}).encode()
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            replies.append(
                client.post(
                    f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                ).status_code
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--max-body-mb", type=float, default=2.0)
    args = parser.parse_args()
    size = int(args.max_body_mb * 2**20)
    with serve_process(
        args.artifact,
        "--slots",
        "2",
        "--max-length",
        "512",
        "--model-name",
        "m",
        "--max-body-mb",
        str(args.max_body_mb),
    ) as (url, _proc):
        ttft_ms(url, "m")  # first request: warm
        alone = measure(url, "m", args.rounds)
        stop, replies = threading.Event(), []
        uploader = threading.Thread(target=flood, args=(url, "m", size, stop, replies), daemon=True)
        uploader.start()
        time.sleep(1.0)
        loaded = measure(url, "m", args.rounds)
        stop.set()
        uploader.join(120)
    rows = [("alone", alone), (f"beside bodies of {size} bytes", loaded)]
    print(f"{'phase':<34} {'/health median ms':>18} {'max':>8} {'TTFT median ms':>15} {'max':>8}")
    for name, r in rows:
        print(
            f"{name:<34} {r['health_ms_median']:>18} {r['health_ms_max']:>8} {r['ttft_ms_median']:>15} {r['ttft_ms_max']:>8}"
        )
    ratio = loaded["ttft_ms_median"] / alone["ttft_ms_median"]
    print(f"big bodies sent: {len(replies)} (status {sorted(set(replies))}); TTFT x{ratio:.2f} beside them")
    from pipeline.bench.system import envelope

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                **envelope(
                    " ".join(["python -m benchmarks.checks.serve_big_body", *sys.argv[1:]]), ("runtime", "pipeline")
                ),
                "artifact": str(args.artifact),
                "body_bytes": size,
                "rounds": args.rounds,
                "big_bodies_sent": len(replies),
                "big_body_statuses": sorted(set(replies)),
                "alone": alone,
                "beside_big_bodies": loaded,
                "ttft_ratio": round(ratio, 2),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
