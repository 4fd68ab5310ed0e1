"""`optimize serve` on a tiny model, driven by the official openai client and raw HTTP."""

import contextlib
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from runtime import Generator
from runtime.serve.app import Server, Settings, create_app
from runtime.serve.launch import free_port, serve_process, wait_healthy

QUESTIONS = [
    "What is the capital of France?",
    "Say hello.",
    "def add(a, b):",
    "Count: 1, 2, 3",
    "Once upon a time",
    "Numbers like 42 and 1000",
]


@pytest.fixture(scope="module")
def served(tiny_export):
    with serve_process(tiny_export, "--slots", "4", "--max-length", "256", "--model-name", "tiny") as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(served):
    return OpenAI(base_url=f"{served}/v1", api_key="unused")


def chat(client, question, **kw):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": question}],
        temperature=kw.pop("temperature", 0),
        max_tokens=kw.pop("max_tokens", 24),
        **kw,
    )


def test_chat_and_completion_with_the_openai_client_streamed_or_not(client):
    whole = chat(client, QUESTIONS[0])
    assert whole.object == "chat.completion" and whole.model == "tiny"
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.prompt_tokens > 5
    stream = chat(client, QUESTIONS[0], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    done = client.completions.create(model="tiny", prompt="The capital of France", temperature=0, max_tokens=12)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 12
    pieces = client.completions.create(
        model="tiny", prompt="The capital of France", temperature=0, max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_greedy_answers_under_concurrency_equal_the_answers_alone(client):
    alone = [chat(client, q, max_tokens=40).choices[0].message.content for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS) * 2) as pool:  # more requests than slots: some queue
        together = list(pool.map(lambda q: chat(client, q, max_tokens=40).choices[0].message.content, QUESTIONS * 2))
    assert together == alone * 2


def test_a_repeated_prompt_reports_its_cached_tokens(client, served):
    """The second identical chat request finds the first one's positions (its freed row, or a busy one):
    every prompt token but the last comes from the cache, the answer is the same, and /metrics counts them."""
    first = chat(client, QUESTIONS[3], max_tokens=8)
    second = chat(client, QUESTIONS[3], max_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{served}/metrics").text)}
    assert families["optimize_prompt_tokens_cached"].samples[0].value >= second.usage.prompt_tokens - 1


def test_a_conversations_next_turn_reuses_the_earlier_turns(client):
    first = chat(client, QUESTIONS[4], max_tokens=8)
    messages = [
        {"role": "user", "content": QUESTIONS[4]},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": QUESTIONS[5]},
    ]
    second = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_seeded_sampling_repeats(client):
    answers = {
        chat(client, QUESTIONS[1], temperature=1.0, top_p=0.9, seed=3, extra_body={"top_k": 50})
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(answers) == 1


def test_stop_strings_cut_the_answer(client):
    full = client.completions.create(model="tiny", prompt="Once upon", temperature=0, max_tokens=30).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model="tiny", prompt="Once upon", temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.index(stop)]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model", "not served here"),
        ({"model": "tiny", "messages": []}, "messages", "non-empty list"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "role"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
            "temperature",
            "between 0 and 2",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p", "(0, 1]"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            "max_tokens",
            "at least 1",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000},
            "max_tokens",
            "at most",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 300}]}, "messages", "context is 256"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "must be 1"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop", "non-empty"),
    ],
)
def test_bad_requests_get_400_naming_the_field(served, body, param, words):
    r = httpx.post(f"{served}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_token_id_prompts_are_checked_against_the_vocabulary(served):
    ok = httpx.post(f"{served}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3
    bad = httpx.post(f"{served}/v1/completions", json={"model": "tiny", "prompt": [5, 10**6], "max_tokens": 2})
    assert bad.status_code == 400 and "token ids below" in bad.json()["error"]["message"]


def test_a_body_that_is_not_json_gets_400(served):
    r = httpx.post(f"{served}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_metrics_parse_as_prometheus_text(client, served):
    chat(client, QUESTIONS[2])
    r = httpx.get(f"{served}/metrics")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in (
        "optimize_time_to_first_token_seconds",
        "optimize_time_per_output_token_seconds",
        "optimize_queue_time_seconds",
        "optimize_requests_running",
        "optimize_requests_waiting",
        "optimize_kv_slots_used",
        "optimize_output_tokens_per_second",
        "optimize_prompt_tokens",
    ):
        assert name in families, name
    count = [s for s in families["optimize_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert count[0].value >= 1
    assert families["optimize_kv_slots"].samples[0].value == 4


# --- in-process servers: slowed down or made to fail on purpose -------------------------------


@contextlib.contextmanager
def serve_in_thread(server):
    """The app on uvicorn in a thread of this process, so a test can reach into the server."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        uv.should_exit = True
        thread.join(30)


@pytest.fixture()
def slow_server(tiny_export):
    """A server whose decode steps take 20 ms, so requests last long enough to interfere."""
    gen = Generator(tiny_export, provider="cpu", graph="fused")
    server = Server(gen, Settings(slots=1, max_length=256, max_waiting=1, model_name="tiny"))
    decode = server.slots.decode

    def slow_decode(tokens):
        time.sleep(0.02)
        return decode(tokens)

    server.slots.decode = slow_decode
    return server


def long_request(stream=False):
    return {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": stream}


def test_overload_gets_429_with_retry_after(slow_server):
    with serve_in_thread(slow_server) as url, ThreadPoolExecutor(5) as pool:
        replies = list(
            pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=long_request(), timeout=60), range(5))
        )
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 2 and 429 in codes  # one slot + one waiting; the rest are turned away
    busy = next(r for r in replies if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1" and "server busy" in busy.json()["error"]["message"]


def test_a_client_that_leaves_mid_stream_frees_its_slot(slow_server):
    with serve_in_thread(slow_server) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=long_request(stream=True), timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.time() + 5
        while slow_server.scheduler.load != (0, 0):
            assert time.time() < deadline, "the slot was not freed"
            time.sleep(0.02)
        metrics = httpx.get(f"{url}/metrics").text
        assert 'optimize_requests_total{finish_reason="cancelled"} 1.0' in metrics
        assert slow_server.slots.lengths.tolist() == [0]
        after = httpx.post(f"{url}/v1/completions", json={**long_request(), "max_tokens": 3}, timeout=30)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3


def test_an_internal_error_fails_that_request_alone(slow_server, sampling_fault):
    slow_server.settings.max_waiting = 4
    slow_server.scheduler.max_waiting = 4
    with serve_in_thread(slow_server) as url, ThreadPoolExecutor(3) as pool:
        bodies = [{**long_request(), "max_tokens": 5, "seed": seed} for seed in (1, sampling_fault, 2)]
        replies = list(pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=30), bodies))
        streamed = httpx.post(f"{url}/v1/completions", json={**bodies[1], "stream": True}, timeout=30)
    assert [r.status_code for r in replies] == [200, 500, 200]
    assert "injected fault" in replies[1].json()["error"]["message"]
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "injected fault" in events[-1]["error"]["message"]


def test_sigterm_lets_the_request_in_flight_finish_then_exits(tiny_export):
    with serve_process(
        tiny_export, "--slots", "2", "--max-length", "256", "--model-name", "tiny", "--shutdown-timeout", "20"
    ) as (url, proc):
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert proc.wait(30) == 0  # a shutdown asked for and completed is a success
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
        events = [json.loads(line[6:]) for line in rest[:-1]]
        assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_the_start_line_says_where_the_slots_are_and_a_missing_cuda_is_one_line(tiny_export):
    import onnxruntime as ort
    from click.testing import CliRunner

    from pipeline.cli import main

    with serve_process(tiny_export, "--slots", "2", "--max-length", "64", "--provider", "cpu") as (url, proc):
        httpx.get(f"{url}/health", timeout=5)
    assert "preallocated in host memory" in proc.stdout.read()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime offers CUDA here: make serve-gpu-check covers it")
    result = CliRunner().invoke(main, ["serve", str(tiny_export), "--provider", "cuda"])
    assert result.exit_code == 1
    assert "provider cuda requested" in result.output and "make install-cuda" in result.output
