"""`optimize serve`: an OpenAI-compatible HTTP server with continuous batching over an exported artifact.

    app.py      routes, SSE streaming, disconnects, 400/429/503   (Starlette on uvicorn)
    protocol.py the OpenAI wire format: request checks and response objects
    engine.py   the scheduler thread: admit, prefill, decode, sample, finish
    slots.py    the KV cache as rows of one preallocated buffer
    text.py     tokens to streamed text, stop strings
    metrics.py  Prometheus metrics and the per-request log line

Beyond the runner's own dependencies it needs starlette, uvicorn and prometheus-client.
"""
