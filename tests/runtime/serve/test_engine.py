"""The scheduler on a tiny model: continuous batching gives each request what it gets alone."""

import queue
import time

import pytest

from runtime import Generator, SamplingParams
from runtime.serve.engine import QueueFull, Request, Scheduler
from runtime.serve.slots import SlotCache

PROMPTS = [[1, 5, 9, 14, 3], [7, 2], [11, 12, 13, 14, 15, 16, 17, 18], [4, 4, 4], [30, 31, 32, 33]]


@pytest.fixture()
def gen(tiny_export):
    return Generator(tiny_export, provider="cpu", graph="fused")


def scheduler(gen, slots=3, **kw):
    return Scheduler(SlotCache(gen.session, gen.contract, slots, 64), gen.tokenizer, gen.eos_ids, **kw)


def request(i, prompt, max_tokens=8, events=None, **kw):
    events = events if events is not None else queue.Queue()
    r = Request(f"r{i}", prompt, max_tokens, kw.pop("params", SamplingParams()), events.put, ignore_eos=True, **kw)
    r.events = events
    return r


def wait_done(requests, timeout=30):
    deadline = time.time() + timeout
    while not all(r.done for r in requests):
        assert time.time() < deadline, "requests did not finish"
        time.sleep(0.01)


def test_staggered_requests_in_a_busy_batch_equal_each_alone(gen):
    alone = [gen.generate([p], 8, ignore_eos=True).tokens[0] for p in PROMPTS]
    s = scheduler(gen, slots=3)  # fewer slots than requests: some wait for a free row
    s.start()
    requests = []
    for i, p in enumerate(PROMPTS):
        requests.append(request(i, p, max_tokens=8 - i % 3 * 2))
        s.submit(requests[-1])
        time.sleep(0.003 * i)
    wait_done(requests)
    s.stop()
    for r, want in zip(requests, alone):
        assert r.finish_reason == "length" and r.tokens == want[: r.max_tokens]
        assert r.events.get_nowait().kind == "text"  # text arrived before the end
    assert s.slots.lengths.tolist() == [0, 0, 0]


def test_sampled_requests_repeat_with_their_seed(gen):
    s = scheduler(gen)
    s.start()
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    first = [request(0, PROMPTS[0], params=params), request(1, PROMPTS[1], params=params)]
    for r in first:
        s.submit(r)
    wait_done(first)
    again = request(2, PROMPTS[0], params=params)
    s.submit(again)
    wait_done([again])
    s.stop()
    assert again.tokens == first[0].tokens


def test_a_cancelled_request_frees_its_slot_and_the_rest_go_on(gen):
    s = scheduler(gen, slots=2)
    decode = s.slots.decode
    s.slots.decode = lambda tokens: (time.sleep(0.01), decode(tokens))[1]  # slow enough to cancel mid-way
    long = request(0, PROMPTS[0], max_tokens=60)
    short = request(1, PROMPTS[1], max_tokens=40)
    s.start()
    s.submit(long)
    s.submit(short)
    while len(long.tokens) < 3:
        time.sleep(0.001)
    long.cancel()
    wait_done([long, short])
    s.stop()
    assert long.finish_reason == "cancelled" and len(long.tokens) < 60
    assert short.finish_reason == "length" and short.tokens == gen.generate([PROMPTS[1]], 40, ignore_eos=True).tokens[0]


def test_an_internal_error_fails_one_request_only(gen, sampling_fault):
    s = scheduler(gen)
    s.start()
    bad = request(0, PROMPTS[0], params=SamplingParams(seed=sampling_fault))
    good = request(1, PROMPTS[1])
    s.submit(bad)
    s.submit(good)
    wait_done([bad, good])
    s.stop()
    assert bad.finish_reason == "error" and "injected fault" in bad.events.get_nowait().message
    assert good.finish_reason == "length" and len(good.tokens) == 8


def test_a_full_queue_refuses(gen):
    s = scheduler(gen, max_waiting=2)  # not started: nothing leaves the queue
    s.submit(request(0, [1]))
    s.submit(request(1, [1]))
    with pytest.raises(QueueFull):
        s.submit(request(2, [1]))


def test_stop_sequences_and_eos_end_a_request(gen):
    alone = gen.generate([PROMPTS[2]], 12, ignore_eos=True).tokens[0]
    stop_text = gen.tokenizer.decode(alone[3:5])
    s = scheduler(gen)
    s.start()
    r = request(0, PROMPTS[2], max_tokens=12, stop=(stop_text,))
    s.submit(r)
    eos = Request("e", PROMPTS[2], 12, SamplingParams(), lambda e: None)
    s.eos_ids = {alone[2]}
    s.submit(eos)
    wait_done([r, eos])
    s.stop()
    assert eos.finish_reason == "stop" and eos.tokens == alone[:2]
    assert r.finish_reason == "stop" and stop_text not in r.stream.output
    assert r.stream.output == gen.tokenizer.decode(alone[: len(r.stream.decoder.ids)])[: len(r.stream.output)]


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(gen):
    """With 3 prompt tokens per step, the 8-token prompt takes three steps while the running rows keep
    decoding, moves down a row when a running request finishes, and everyone gets what they get alone."""
    alone = [gen.generate([p], 6, ignore_eos=True).tokens[0] for p in PROMPTS]
    s = scheduler(gen, slots=3, max_prefill_tokens=3)
    calls = []  # ("prefill", row, first prompt token, tokens) and ("decode", rows)
    extend, decode = s.slots.extend, s.slots.decode
    s.slots.extend = lambda row, prompt, count: (
        calls.append(("prefill", row, prompt[0], count)),
        extend(row, prompt, count),
    )[1]
    s.slots.decode = lambda tokens: (calls.append(("decode", len(tokens))), decode(tokens))[1]
    requests = [request(i, p, max_tokens=2 if i == 1 else 6) for i, p in enumerate(PROMPTS)]
    for r in requests:
        s.submit(r)
    for _ in range(100):
        if all(r.done for r in requests):
            break
        s.step()
    assert [r.tokens for r in requests] == [a[: r.max_tokens] for r, a in zip(requests, alone)]
    prefills = [c for c in calls if c[0] == "prefill"]
    assert max(c[3] for c in prefills) == 3 and sum(c[3] for c in prefills) == sum(len(p) for p in PROMPTS)
    eight = [i for i, c in enumerate(calls) if c[0] == "prefill" and c[2] == PROMPTS[2][0]]
    assert len(eight) == 3 and len({calls[i][1] for i in eight}) == 2  # three chunks, moved down a row on the way
    assert any(c[0] == "decode" for c in calls[eight[0] : eight[-1]])  # the running rows decoded meanwhile
    assert s.slots.lengths.tolist() == [0, 0, 0] and s.filling is None


def test_a_request_cancelled_while_its_prompt_is_filled_frees_the_row(gen):
    s = scheduler(gen, slots=2, max_prefill_tokens=2)
    long, short = request(0, PROMPTS[2], max_tokens=4), request(1, PROMPTS[1], max_tokens=4)
    s.submit(long)
    s.step()  # long: 2 of its 8 tokens
    assert s.filling is long and s.slots.lengths[0] == 2
    long.cancel()
    s.submit(short)
    while not short.done:
        s.step()
    assert long.finish_reason == "cancelled" and long.tokens == []
    assert short.tokens == gen.generate([PROMPTS[1]], 4, ignore_eos=True).tokens[0]
    assert s.filling is None and s.slots.lengths.tolist() == [0, 0]
