"""The HTTP side: OpenAI-compatible routes over the scheduler (Starlette, run by uvicorn).

    POST /v1/chat/completions, /v1/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

Each request becomes a scheduler `Request` whose events the scheduler thread hands to this event
loop (`call_soon_threadsafe`) through a per-request queue. A client that goes away cancels its
request; the scheduler frees the slot at its next step.

No client can stall or break the others: bodies are capped (`max_body_bytes`, refused from the
Content-Length header or while reading), JSON parsing, checks, chat templating and tokenizing run
in a worker thread, every malformed request is a 4xx in OpenAI's error shape naming the field, and
anything unexpected is a 500 in the same shape with a request id in the log. With `api_key`, the
completion and model routes (and /health and /metrics if `protect_probes`) need
`Authorization: Bearer KEY`, compared in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from functools import partial

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.generate import Generator
from runtime.serve import protocol
from runtime.serve.engine import Event, QueueFull, Request, Scheduler, ShuttingDown
from runtime.serve.metrics import Metrics
from runtime.serve.slots import SlotCache

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5
log = logging.getLogger("optimize.serve")


@dataclass
class Settings:
    slots: int = 8
    max_length: int = 2048
    max_waiting: int = 64
    max_prefill_tokens: int = 512
    model_name: str = "model"
    reuse_prefixes: bool = True  # a prompt starting like a cached sequence takes those positions from it
    max_body_bytes: int = 2 * 2**20  # a request body beyond this is refused (413) before it is read whole
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <api_key>`
    protect_probes: bool = False  # /health and /metrics need the key too (else open, for load balancers)
    special_tokens: bool = False  # special-token text in chat messages acts as control tokens (else plain text)


class Server:
    """The model, its KV slots, the scheduler and the metrics: what the routes share."""

    def __init__(self, generator: Generator, settings: Settings):
        self.generator, self.settings = generator, settings
        self.slots = SlotCache(
            generator.session,
            generator.contract,
            settings.slots,
            settings.max_length,
            settings.reuse_prefixes,
            generator.float_prefill,
            device=generator.device,
        )
        self.metrics = Metrics(settings.slots)
        self.scheduler = Scheduler(
            self.slots,
            generator.tokenizer,
            generator.eos_ids,
            settings.max_waiting,
            settings.max_prefill_tokens,
            self.metrics,
        )
        self.started = int(time.time())

    def warm_up(self) -> None:
        """Before the first request: prompts from 16 tokens to the longest a slot takes, then decode steps
        with every slot in use, so ONNX Runtime's buffers grow now rather than under load."""
        pad, slots = self.generator.pad_id, self.slots
        length = slots.max_length - 1
        while length >= 16:
            slots.prefill(0, [pad] * length)
            slots.free(0)
            slots.forget()  # so the next, shorter prompt runs whole instead of reusing this one's positions
            length //= 2
        for row in range(slots.slots):
            slots.prefill(row, [pad] * 4)
        slots.decode([pad] * slots.slots)
        for row in range(slots.slots):
            slots.free(row)
        slots.forget()  # no prompt should start from the warm-up's padding


def create_app(server: Server) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    probes = server.settings.protect_probes
    routes = [
        Route("/v1/chat/completions", _guarded(server, partial(_complete, server, kind="chat")), methods=["POST"]),
        Route("/v1/completions", _guarded(server, partial(_complete, server, kind="completion")), methods=["POST"]),
        Route("/v1/models", _guarded(server, partial(_models, server)), methods=["GET"]),
        Route("/health", _guarded(server, partial(_health, server), probes), methods=["GET"]),
        Route("/metrics", _guarded(server, partial(_metrics, server), probes), methods=["GET"]),
    ]
    handlers = {HTTPException: _http_error, Exception: _unexpected}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


def _guarded(server: Server, handler, protected: bool = True):
    """The route behind the API key (when one is set and the route is protected), with any unexpected error
    answered as a JSON 500 naming a request id that the log line carries with the traceback."""
    key = (server.settings.api_key or "").encode()

    async def route(http: HttpRequest) -> Response:
        if key and protected:
            given = http.headers.get("authorization", "")
            token = given[7:].strip().encode() if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, key):
                return _error(
                    401,
                    "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
        try:
            return await handler(http)
        except Exception as e:  # noqa: BLE001 - one request's failure must not take the server's shape with it
            return _unexpected(http, e)

    return route


def _unexpected(http: HttpRequest, error: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex[:12]
    log.error("request %s %s %s failed", request_id, http.method, http.url.path, exc_info=error)
    return _error(
        500, f"internal error ({type(error).__name__}); request id {request_id} in the server's log", "server_error"
    )


async def _http_error(http: HttpRequest, error: HTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return _error(error.status_code, f"{http.method} {http.url.path}: {error.detail}", kind, headers=error.headers)


async def _models(server: Server, _http: HttpRequest) -> JSONResponse:
    model = {
        "id": server.settings.model_name,
        "object": "model",
        "created": server.started,
        "owned_by": "llm-optimize",
        "max_model_len": server.settings.max_length,
    }
    return JSONResponse({"object": "list", "data": [model]})


async def _health(server: Server, _http: HttpRequest) -> JSONResponse:
    running, waiting = server.scheduler.load
    return JSONResponse({"status": "ok", "running": running, "waiting": waiting, "slots": server.settings.slots})


async def _metrics(server: Server, _http: HttpRequest) -> Response:
    return Response(server.metrics.exposition(*server.scheduler.load), media_type=CONTENT_TYPE_LATEST)


async def _complete(server: Server, http: HttpRequest, kind: str) -> Response:
    settings = server.settings
    try:
        raw = await _read_body(http, settings.max_body_bytes)
        job = await asyncio.to_thread(_parse, server, kind, raw)  # templating and tokenizing off the event loop
    except _TooLarge as e:
        server.metrics.rejected.labels("413").inc()
        return _error(413, str(e), "invalid_request_error", code="request_too_large")
    except ClientDisconnect:
        return Response(status_code=499)
    except protocol.BadRequest as e:
        server.metrics.rejected.labels("400").inc()
        return JSONResponse(e.body(), status_code=400)
    events: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:  # called on the scheduler thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(events.put_nowait, event)

    request = Request(protocol.new_id(kind), job.prompt, job.max_tokens, job.params, emit, job.stop, job.ignore_eos)
    try:
        server.scheduler.submit(request)
    except QueueFull as e:
        server.metrics.rejected.labels("429").inc()
        return _error(
            429, f"server busy: {e}; retry later", "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    except ShuttingDown as e:
        server.metrics.rejected.labels("503").inc()
        return _error(503, str(e), "service_unavailable")
    if job.stream:
        return StreamingResponse(
            _stream(server, job, request, events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await _collect(server, http, job, request, events)


class _TooLarge(Exception):
    pass


async def _read_body(http: HttpRequest, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed `limit` (from Content-Length, or while it streams in)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"the request body is {int(declared)} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"the request body is over {limit} bytes, the most this server takes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(server: Server, kind: str, raw: bytes) -> protocol.Job:
    """JSON, then the OpenAI checks: every problem a BadRequest (so a 400 naming the field), whatever the bytes."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, or nested deeper than the parser goes
        raise protocol.BadRequest(
            "the request body is not valid JSON (UTF-8, nested at most a few hundred deep)"
        ) from None
    settings = server.settings
    return protocol.parse(
        kind, body, settings.model_name, settings.max_length, server.generator.tokenizer, settings.special_tokens
    )


async def _collect(
    server: Server, http: HttpRequest, job: protocol.Job, request: Request, events: asyncio.Queue[Event]
) -> Response:
    pieces = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    return Response(status_code=499)
                continue
            if event.kind == "text":
                pieces.append(event.text)
            elif event.kind == "error":
                return _error(500, event.message, "server_error")
            else:
                usage = protocol.usage(len(job.prompt), len(request.tokens), request.cached_tokens)
                return JSONResponse(
                    protocol.response(
                        job.kind, request.id, server.settings.model_name, "".join(pieces), event.finish_reason, usage
                    )
                )
    finally:
        if not request.done:
            request.cancel()


async def _stream(server: Server, job: protocol.Job, request: Request, events: asyncio.Queue[Event]):
    """Server-sent events; leaving early (client gone, task cancelled) cancels the request."""
    model, first = server.settings.model_name, True
    try:
        while True:
            event = await events.get()
            if event.kind == "text":
                yield _sse(protocol.chunk(job.kind, request.id, model, event.text, first=first))
                first = False
            elif event.kind == "error":
                yield _sse(protocol.error_body(event.message, "server_error"))
                break
            else:
                yield _sse(
                    protocol.chunk(job.kind, request.id, model, "" if first else None, event.finish_reason, first=first)
                )
                if job.include_usage:
                    yield _sse(
                        protocol.chunk(
                            job.kind,
                            request.id,
                            model,
                            None,
                            usage_=protocol.usage(len(job.prompt), len(request.tokens), request.cached_tokens),
                        )
                    )
                break
        yield "data: [DONE]\n\n"
    finally:
        if not request.done:
            request.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(status: int, message: str, kind: str, headers: dict | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, code=code), status_code=status, headers=headers)
