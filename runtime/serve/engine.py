"""The scheduler: one thread owns the model session and runs continuous batching.

    submit() ──► waiting (bounded) ──admit──► prefill into a free slot ──► first token
                                                                              │
        ┌────────────── one decode step for every running row ◄───────────────┘
        └──► sample per request ──► text event ──► done? free the slot at once

Between two decode steps the scheduler drops cancelled requests and admits waiting ones: a prefill
each, of the prompt tokens no cached prefix holds, `max_prefill_tokens` of them per step, so the
running rows are never stalled for longer than that. A longer prompt is prefilled in chunks over
several steps (one prompt at a time, in the row after the running ones) and joins the decode steps
when its last chunk is in. Then it decodes. Events go to each request's `emit` callback from this thread; the
HTTP side turns them into responses. A failure inside one request's handling fails that request
alone; a failing decode step fails the rows in it, and the scheduler goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from runtime.sampling import SamplingParams, sample
from runtime.serve.slots import SlotCache
from runtime.serve.text import TextStream
from runtime.tokenizer import Tokenizer

log = logging.getLogger("optimize.serve")


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class ShuttingDown(Exception):
    """The server no longer takes requests."""


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    message: str = ""


@dataclass
class Request:
    id: str
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens the prefill took from a cached prefix
    cancelled: bool = False  # set from any thread (client gone); acted on at the next step boundary
    stream: TextStream | None = None
    rng: np.random.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finished is not None


class Observer(Protocol):
    def finished(self, request: Request) -> None: ...
    def step(self, new_tokens: int) -> None: ...


class Scheduler:
    def __init__(
        self,
        slots: SlotCache,
        tokenizer: Tokenizer,
        eos_ids: set[int],
        max_waiting: int = 64,
        max_prefill_tokens: int = 512,
        observer: Observer | None = None,
    ):
        self.slots, self.tokenizer, self.eos_ids = slots, tokenizer, eos_ids
        self.max_waiting, self.max_prefill_tokens, self.observer = max_waiting, max_prefill_tokens, observer
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] holds cache row i
        self.filling: Request | None = None  # a prompt prefilled in chunks, in row len(running)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._produced = 0  # tokens produced in the current step

    # --- called from other threads ---------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def refuse_new(self) -> None:
        """From now on submit() raises ShuttingDown; the requests already in run to their end."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, cancel the ones left, and wait for the thread."""
        with self._cond:
            self._closing = True
            for request in list(self.waiting) + self.running + ([self.filling] if self.filling else []):
                request.cancel()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting); a prompt part-way through its chunks counts as running"""
        return len(self.running) + (self.filling is not None), len(self.waiting)

    # --- the scheduler thread --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self.running and not self.filling and not self._closing:
                    self._cond.wait()
                if self._closing and not self.waiting and not self.running and not self.filling:
                    return
            self.step()

    def step(self) -> None:
        """One step boundary: drop cancelled requests, prefill (up to `max_prefill_tokens`), decode."""
        self._produced = 0
        self._drop_cancelled()
        self._admit()
        if self.running:
            self._decode()
        if self.observer:
            self.observer.step(self._produced)

    def _drop_cancelled(self) -> None:
        with self._cond:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self._finish(request, "cancelled")
        self._release([row for row, r in enumerate(self.running) if r.cancelled], "cancelled")
        if self.filling is not None and self.filling.cancelled:
            self.slots.free(len(self.running))
            self._finish(self.filling, "cancelled")
            self.filling = None

    def _admit(self) -> None:
        """Prefill up to `max_prefill_tokens` prompt tokens into the row after the running ones: first the
        next chunk of a prompt already begun, then waiting requests while rows are free. A prompt whose
        last chunk is in starts running (and yields its first token)."""
        budget = self.max_prefill_tokens
        while budget > 0:
            request, row = self.filling, len(self.running)
            if request is None:
                if row >= self.slots.slots:
                    return
                with self._cond:
                    if not self.waiting:
                        return
                    request = self.waiting.popleft()
                request.admitted = time.perf_counter()
                try:
                    request.cached_tokens = self.slots.start(row, request.prompt)
                except Exception as e:  # noqa: BLE001 - one request's failure must not stop the server
                    self.slots.free(row)
                    self._fail(request, e)
                    continue
                self.filling = request
            remaining = len(request.prompt) - int(self.slots.lengths[row])
            chunk = min(remaining, budget)
            try:
                logits = self.slots.extend(row, request.prompt, chunk)
            except Exception as e:  # noqa: BLE001
                self.slots.free(row)
                self.filling = None
                self._fail(request, e)
                continue
            budget -= chunk
            if chunk < remaining:
                return  # the rest in the next steps
            self.filling = None
            self.running.append(request)
            request.stream = TextStream(self.tokenizer, request.stop)
            request.rng = np.random.default_rng(request.params.seed)
            if self._accept(request, logits, row):
                self._release([row], None)

    def _decode(self) -> None:
        """One step for every running row; finished rows are released before returning."""
        tokens = np.array([r.tokens[-1] for r in self.running], dtype=np.int64)
        try:
            logits = self.slots.decode(tokens)
        except Exception as e:  # noqa: BLE001
            filling_row = len(self.running)
            for row, request in enumerate(self.running):
                self._fail(request, e)
                self.slots.free(row)
            self.running = []
            self._settle_filling(filling_row)
            return
        done = [row for row, request in enumerate(self.running) if self._accept(request, logits[row], row)]
        self._release(done, None)

    def _accept(self, request: Request, logits: np.ndarray, row: int) -> bool:
        """Sample the request's next token and stream its text; True when the request is finished."""
        try:
            token = sample(logits, request.params, request.rng)
            if token in self.eos_ids and not request.ignore_eos:
                request.finish_reason = "stop"
                return True
            request.tokens.append(token)
            self._produced += 1
            if request.first_token is None:
                request.first_token = time.perf_counter()
            piece = request.stream.push(token)
            if piece:
                request.emit(Event("text", piece))
            if request.stream.stopped:
                request.finish_reason = "stop"
            elif len(request.tokens) >= request.max_tokens or self.slots.lengths[row] >= self.slots.max_length:
                request.finish_reason = "length"
            return request.finish_reason is not None
        except Exception as e:  # noqa: BLE001
            self._fail(request, e)
            return True

    def _release(self, rows: list[int], reason: str | None) -> None:
        """Finish the requests in `rows` and free their slots, keeping the rows in use a prefix."""
        filling_row = len(self.running)
        for row in sorted(rows, reverse=True):
            request = self.running[row]
            if request.finished is None:
                self._finish(request, reason or request.finish_reason)
            last = len(self.running) - 1
            self.slots.free(row)
            if row != last:
                self.slots.move(last, row)
                self.running[row] = self.running[last]
            self.running.pop()
        self._settle_filling(filling_row)

    def _settle_filling(self, row: int) -> None:
        """Move the prompt being filled from `row` (where it was, after the running rows before they shrank)
        to the row right after the running ones, where it will run."""
        if self.filling is not None and row != len(self.running):
            self.slots.move(row, len(self.running))

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason, request.finished = reason, time.perf_counter()
        if reason == "cancelled":  # the client left, or the server is stopping: tell whoever still listens
            request.emit(Event("error", message="the request was cancelled (client gone or server shutting down)"))
        else:
            tail = request.stream.flush() if request.stream else ""
            if tail:
                request.emit(Event("text", tail))
            request.emit(Event("done", finish_reason=reason))
        if self.observer:
            self.observer.finished(request)

    def _fail(self, request: Request, error: Exception) -> None:
        log.exception("request %s failed", request.id, exc_info=error)
        request.finish_reason, request.finished = "error", time.perf_counter()
        request.emit(Event("error", message=f"internal error: {type(error).__name__}: {error}"))
        if self.observer:
            self.observer.finished(request)
