"""SlotCache: prefill into a row in place, decode only the rows in use, move a row into a hole."""
import numpy as np
import pytest

from runtime import Generator, RuntimeFailure
from runtime.serve.slots import SlotCache

PROMPTS = [[1, 5, 9, 14, 3], [7, 2], [11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(params=["float", "int8"], ids=["float-kv", "int8-kv"])
def gen(request):
    folder = request.getfixturevalue("tiny_export" if request.param == "float" else "tiny_export_int8_kv")
    return Generator(folder, provider="cpu", graph="fused")


def greedy_alone(gen, prompt, n):
    return gen.generate([prompt], max_new_tokens=n, ignore_eos=True).tokens[0]


def test_rows_decoded_together_match_each_sequence_alone(gen):
    slots = SlotCache(gen.session, gen.contract, slots=4, max_length=32)
    out = [[int(np.argmax(slots.prefill(row, p)))] for row, p in enumerate(PROMPTS)]
    for _ in range(5):
        logits = slots.decode(np.array([o[-1] for o in out]))
        for row, o in enumerate(out):
            o.append(int(np.argmax(logits[row])))
    assert out == [greedy_alone(gen, p, 6) for p in PROMPTS]
    assert slots.lengths.tolist() == [len(p) + 5 for p in PROMPTS] + [0]


def test_a_moved_row_continues_as_if_it_had_not_moved(gen):
    slots = SlotCache(gen.session, gen.contract, slots=3, max_length=32)
    first = [int(np.argmax(slots.prefill(row, p))) for row, p in enumerate(PROMPTS[:3])]
    logits = slots.decode(np.array(first))
    last = [int(np.argmax(x)) for x in logits]
    slots.free(0)  # sequence 0 ends; row 2 fills the hole
    slots.move(2, 0)
    out = [first[2], last[2]]
    token = last[2]
    for _ in range(4):
        logits = slots.decode(np.array([token, last[1]]))
        token, last[1] = int(np.argmax(logits[0])), int(np.argmax(logits[1]))
        out.append(token)
    assert out == greedy_alone(gen, PROMPTS[2], 6)
    assert slots.lengths[2] == 0


def test_a_row_is_bound_once_and_the_cache_is_never_reallocated(gen):
    slots = SlotCache(gen.session, gen.contract, slots=2, max_length=16)
    addresses = [b.ctypes.data for b in slots.buffers]
    for _ in range(3):
        slots.prefill(0, PROMPTS[0])
        slots.decode(np.array([1]))
        slots.free(0)
    assert [b.ctypes.data for b in slots.buffers] == addresses
    assert set(slots._bindings) == {(0, 1)}


def test_bad_sizes_are_readable_errors(gen):
    with pytest.raises(RuntimeFailure, match="exceeds the model's"):
        SlotCache(gen.session, gen.contract, slots=1, max_length=10**7)
    slots = SlotCache(gen.session, gen.contract, slots=1, max_length=8)
    with pytest.raises(RuntimeFailure, match="1 to 7 tokens"):
        slots.prefill(0, list(range(1, 9)))
    slots.prefill(0, [1, 2, 3])
    with pytest.raises(RuntimeFailure, match="in use"):
        slots.prefill(0, [1])


SHARED = [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]  # a system prompt and chat template, say


def test_a_prompt_reuses_the_longest_cached_prefix_and_gets_the_same_logits(gen):
    """From a running row (copied), from its own freed row (in place), from a freed row elsewhere (copied),
    never the whole prompt (its last token makes the logits); each result equals a prefill from nothing."""
    fresh = SlotCache(gen.session, gen.contract, slots=1, max_length=32, reuse_prefixes=False)

    def alone(prompt):
        fresh.free(0)
        return fresh.prefill(0, prompt).copy()

    slots = SlotCache(gen.session, gen.contract, slots=3, max_length=32)
    first, second, third = SHARED + [1, 2, 3], SHARED + [4, 5], SHARED[:6] + [9]
    np.testing.assert_allclose(slots.prefill(0, first), alone(first), atol=1e-5)
    assert slots.last_cached == 0
    np.testing.assert_allclose(slots.prefill(1, second), alone(second), atol=1e-5)  # row 0 runs: copied
    assert slots.last_cached == len(SHARED)
    token = int(np.argmax(slots.decode(np.array([7, 8]))[1]))
    slots.free(1)
    np.testing.assert_allclose(slots.prefill(1, second + [8, token]), alone(second + [8, token]), atol=1e-5)
    assert slots.last_cached == len(second) + 1  # its own freed row, in place, decoded token included
    slots.free(0)
    np.testing.assert_allclose(slots.prefill(2, third), alone(third), atol=1e-5)
    assert slots.last_cached == 6
    slots.free(2)
    np.testing.assert_allclose(slots.prefill(2, list(first)), alone(first), atol=1e-5)  # all cached but the last
    assert slots.last_cached == len(first) - 1


def test_a_reused_prefix_decodes_as_if_prefilled_whole(gen):
    slots = SlotCache(gen.session, gen.contract, slots=2, max_length=32)
    slots.prefill(0, SHARED + [1])
    prompt = SHARED + [2, 3]
    out = [int(np.argmax(slots.prefill(1, prompt)))]
    assert slots.last_cached == len(SHARED)
    for _ in range(5):
        out.append(int(np.argmax(slots.decode(np.array([1, out[-1]]))[1])))
    assert out == greedy_alone(gen, prompt, 6)


def test_moves_carry_the_prefix_and_reuse_can_be_turned_off(gen):
    slots = SlotCache(gen.session, gen.contract, slots=2, max_length=32)
    slots.prefill(0, [1, 2])
    slots.prefill(1, SHARED)
    slots.free(0)
    slots.move(1, 0)
    assert slots.tokens[0] == SHARED
    slots.prefill(1, SHARED + [3])  # the old row 1 still holds SHARED too; itself wins the tie, in place
    assert slots.last_cached == len(SHARED)
    off = SlotCache(gen.session, gen.contract, slots=2, max_length=32, reuse_prefixes=False)
    off.prefill(0, SHARED)
    off.prefill(1, SHARED + [3])
    assert off.last_cached == 0
    off.free(0)
    off.free(1)
    off.forget()
    assert off.tokens == [[], []]
