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
