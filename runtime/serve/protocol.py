"""The OpenAI wire format: request bodies checked into a `Job`, and the response objects.

Every problem with a request is a `BadRequest` naming the field and what would be accepted; the
server answers it with HTTP 400 in OpenAI's error shape. Fields we cannot honour (n > 1, logprobs,
penalties) are refused rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer

MAX_STOP_STRINGS = 8


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code

    def body(self) -> dict:
        return error_body(str(self), "invalid_request_error", self.param, self.code)


@dataclass(frozen=True)
class Job:
    kind: str  # "chat" | "completion"
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def parse(kind: str, body, model_name: str, max_length: int, tokenizer: Tokenizer, special_tokens: bool = False) -> Job:
    """Check a /v1/chat/completions (`kind="chat"`) or /v1/completions body against this server. `special_tokens`:
    special-token text in chat messages is read as control tokens (the operator's choice; off, it is plain text)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model != model_name:
        raise BadRequest(
            f"model {_short(model)} is not served here; this server serves {model_name!r}", "model", "model_not_found"
        )
    _refuse_unsupported(body)
    prompt = (
        _chat_prompt(body, tokenizer, special_tokens, max_length)
        if kind == "chat"
        else _completion_prompt(body, tokenizer, max_length)
    )
    if len(prompt) >= max_length:
        raise BadRequest(
            f"the prompt has {len(prompt)} tokens; this server's context is {max_length} tokens per "
            f"request (prompt plus completion)",
            "messages" if kind == "chat" else "prompt",
            "context_length_exceeded",
        )
    room = max_length - len(prompt)
    default = room if kind == "chat" else min(16, room)  # OpenAI's defaults: the context for chat, 16 for completions
    max_tokens = _integer(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", default)
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if max_tokens > room:
        raise BadRequest(
            f"this server's context is {max_length} tokens per request; the prompt has {len(prompt)}, "
            f"so max_tokens can be at most {room}, got {max_tokens}",
            "max_tokens",
            "context_length_exceeded",
        )
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    return Job(
        kind,
        prompt,
        max_tokens,
        _sampling(body),
        _stop(body),
        _flag(body, "stream"),
        bool(stream_options.get("include_usage", False)),
        _flag(body, "ignore_eos"),
    )


def _refuse_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise BadRequest(f"n must be 1 (one choice per request), got {_short(body.get('n'))}", "n")
    if body.get("best_of", 1) not in (1, None):
        raise BadRequest("best_of is not supported; send separate requests", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported; leave it out or set it to 0", name)
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "logit_bias"):
        if body.get(name) not in (None, False, 0, {}, []):
            raise BadRequest(f"{name} is not supported by this server", name)


def _chat_prompt(body: dict, tokenizer: Tokenizer, special_tokens: bool, max_length: int) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(
                f"messages[{i}] needs a role of system, developer, user or assistant", f"messages[{i}].role"
            )
        role = "system" if message["role"] == "developer" else message["role"]
        clean.append({"role": role, "content": _content(message.get("content"), f"messages[{i}].content")})
    _fits(sum(len(m["content"]) for m in clean), tokenizer, max_length, "messages")
    try:
        return tokenizer.encode_messages(clean, trusted=special_tokens)
    except Exception as e:  # noqa: BLE001 - the template's own complaint is the useful message
        raise BadRequest(f"the chat template refused these messages: {e}", "messages") from e


def _fits(chars: int, tokenizer: Tokenizer, max_length: int, param: str) -> None:
    """Refuse text that cannot fit the context whatever its tokens, before tokenizing it (megabytes take seconds)."""
    least = tokenizer.fewest_tokens(chars)
    if least >= max_length:
        raise BadRequest(
            f"{param}: {chars} characters, so at least {least} tokens; this server's context is "
            f"{max_length} tokens per request (prompt plus completion)",
            param,
            "context_length_exceeded",
        )


def _content(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise BadRequest(f"{param} must be a string or a list of text parts", param)


def _completion_prompt(body: dict, tokenizer: Tokenizer, max_length: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        _fits(len(prompt), tokenizer, max_length, "prompt")
        try:
            return tokenizer.encode(prompt)
        except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate, which JSON can carry and UTF-8 cannot
            raise BadRequest(f"prompt could not be tokenized ({type(e).__name__})", "prompt") from None
    vocab = tokenizer.backend.get_vocab_size()
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
        return list(prompt)
    raise BadRequest(
        f"prompt must be one non-empty string or one list of token ids below {vocab} (send one request per prompt)",
        "prompt",
    )


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise BadRequest(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = _integer(body, "top_k", 0)
    if top_k < -1:
        raise BadRequest(f"top_k must be -1 or 0 (no cut) or a positive count, got {top_k}", "top_k")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise BadRequest(f"seed must be a non-negative integer, got {_short(seed)}", "seed")
    return SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return tuple(stop)


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {_short(value)}", name)
    try:
        return float(value)
    except OverflowError:
        raise BadRequest(f"{name} must be a number of ordinary size", name) from None


def _integer(body: dict, name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {_short(value)}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {_short(value)}", name)
    return value


def _short(value, limit: int = 60) -> str:
    """A client's value quoted in an error, cut short: an error body never echoes a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# --- responses -----------------------------------------------------------------------------


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens whose KV came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response(kind: str, id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        if kind == "chat"
        else {"index": 0, "text": text, "logprobs": None}
    )
    choice["finish_reason"] = finish_reason
    return {
        "id": id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_,
    }


def chunk(
    kind: str,
    id: str,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    first: bool = False,
    usage_: dict | None = None,
) -> dict:
    """One server-sent event's object; `text=None` with `usage_` is the closing usage chunk."""
    if text is None and usage_ is not None:
        choices = []
    elif kind == "chat":
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body = {
        "id": id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body
