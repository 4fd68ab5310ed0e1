"""Serving metrics: per-request latencies and token counts, server-wide load, in Prometheus form.

Each request ends with one log line summarising it; `/metrics` exposes the same figures as
histograms and counters, plus gauges for running and waiting requests, KV slots in use and the
output tokens/s of the last few seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from runtime.serve.engine import Request

log = logging.getLogger("optimize.serve")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self, slots: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "optimize_requests", "Finished requests by how they ended", ["finish_reason"], registry=r
        )
        self.rejected = Counter("optimize_requests_rejected", "Requests refused before running", ["status"], registry=r)
        self.ttft = Histogram(
            "optimize_time_to_first_token_seconds",
            "From arrival to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "optimize_time_per_output_token_seconds",
            "Mean gap between output tokens of a request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "optimize_queue_time_seconds",
            "From arrival to the start of the prefill",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "optimize_request_seconds", "From arrival to the last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Histogram(
            "optimize_prompt_tokens", "Prompt tokens per request", buckets=TOKEN_BUCKETS, registry=r
        )
        self.cached_tokens = Counter(
            "optimize_prompt_tokens_cached", "Prompt tokens whose KV came from a cached prefix", registry=r
        )
        self.output_tokens = Histogram(
            "optimize_output_tokens", "Output tokens per request", buckets=TOKEN_BUCKETS, registry=r
        )
        self.running = Gauge("optimize_requests_running", "Requests holding a KV slot", registry=r)
        self.waiting = Gauge("optimize_requests_waiting", "Requests queued for a slot", registry=r)
        self.slots_used = Gauge("optimize_kv_slots_used", "KV-cache slots in use", registry=r)
        Gauge("optimize_kv_slots", "KV-cache slots in all", registry=r).set(slots)
        self.rate = Gauge(
            "optimize_output_tokens_per_second", f"Output tokens/s over the last {RATE_WINDOW_S:.0f} s", registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._lock = threading.Lock()

    def finished(self, request: Request) -> None:
        self.requests.labels(request.finish_reason).inc()
        queue_s = (request.admitted or request.finished) - request.submitted
        ttft_s = request.first_token - request.submitted if request.first_token else None
        n = len(request.tokens)
        tpot_s = (request.finished - request.first_token) / (n - 1) if request.first_token and n > 1 else None
        self.queue.observe(queue_s)
        self.e2e.observe(request.finished - request.submitted)
        self.prompt_tokens.observe(len(request.prompt))
        self.cached_tokens.inc(request.cached_tokens)
        self.output_tokens.observe(n)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        log.info(
            "request %s %s: prompt %d tokens (%d cached), output %d, queue %.0f ms, ttft %s, tpot %s, total %.0f ms",
            request.id,
            request.finish_reason,
            len(request.prompt),
            request.cached_tokens,
            n,
            queue_s * 1000,
            _ms(ttft_s),
            _ms(tpot_s),
            (request.finished - request.submitted) * 1000,
        )

    def step(self, new_tokens: int) -> None:
        """The scheduler produced `new_tokens` in one step."""
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, new_tokens))
            self._forget_before(now - RATE_WINDOW_S)

    def exposition(self, running: int, waiting: int) -> bytes:
        """The Prometheus text, with the load and the token rate as of now (a quiet server's rate decays to 0)."""
        self.running.set(running)
        self.slots_used.set(running)
        self.waiting.set(waiting)
        with self._lock:
            self._forget_before(time.monotonic() - RATE_WINDOW_S)
            self.rate.set(sum(t for _, t in self._recent) / RATE_WINDOW_S)
        return generate_latest(self.registry)

    def _forget_before(self, cutoff: float) -> None:
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
