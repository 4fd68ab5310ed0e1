"""SlotCache: prefill into a row in place, decode only the rows in use, move a row into a hole."""

import numpy as np
import pytest

from runtime import Generator, RuntimeFailure
from runtime.serve.slots import SlotCache

PROMPTS = [[1, 5, 9, 14, 3], [7, 2], [11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(params=["float", "int8", "int8-kernel"], ids=["float-kv", "int8-kv", "int8-kv-kernel-prompts"])
def gen(request):
    """int8-kv: prompts through the float-cache twin graph (the default); int8-kv-kernel-prompts: through the int8 graph."""
    folder = request.getfixturevalue("tiny_export" if request.param == "float" else "tiny_export_int8_kv")
    return Generator(folder, provider="cpu", graph="fused", float_prefill=request.param != "int8-kernel")


def make_slots(gen, slots: int, max_length: int, **kw) -> SlotCache:
    """As the server makes them: an int8 cache's prompts run through the float prefill graph."""
    return SlotCache(gen.session, gen.contract, slots, max_length, float_prefill=gen.float_prefill, **kw)


def greedy_alone(gen, prompt, n):
    return gen.generate([prompt], max_new_tokens=n, ignore_eos=True).tokens[0]


def test_rows_decoded_together_match_each_sequence_alone(gen):
    slots = make_slots(gen, slots=4, max_length=32)
    out = [[int(np.argmax(slots.prefill(row, p)))] for row, p in enumerate(PROMPTS)]
    for _ in range(5):
        logits = slots.decode(np.array([o[-1] for o in out]))
        for row, o in enumerate(out):
            o.append(int(np.argmax(logits[row])))
    assert out == [greedy_alone(gen, p, 6) for p in PROMPTS]
    assert slots.lengths.tolist() == [len(p) + 5 for p in PROMPTS] + [0]


def test_a_moved_row_continues_as_if_it_had_not_moved(gen):
    slots = make_slots(gen, slots=3, max_length=32)
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
    slots = make_slots(gen, slots=2, max_length=16)
    addresses = [b.ctypes.data for b in slots.buffers]
    for _ in range(3):
        slots.prefill(0, PROMPTS[0])
        slots.decode(np.array([1]))
        slots.free(0)
    assert [b.ctypes.data for b in slots.buffers] == addresses
    assert set(slots._bindings) == {(0, 1)}


def test_bad_sizes_are_readable_errors(gen):
    with pytest.raises(RuntimeFailure, match="exceeds the model's"):
        make_slots(gen, slots=1, max_length=10**7)
    slots = make_slots(gen, slots=1, max_length=8)
    with pytest.raises(RuntimeFailure, match="1 to 7 tokens"):
        slots.prefill(0, list(range(1, 9)))
    slots.prefill(0, [1, 2, 3])
    with pytest.raises(RuntimeFailure, match="in use"):
        slots.prefill(0, [1])


SHARED = [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]  # a system prompt and chat template, say


def reuse_atol(gen) -> float:
    """A float cache, or an int8 cache whose prompts run in the int8 graph: a reused prefix holds the very
    keys and values (or codes) a whole prefill reads. Int8 cache with the float twin: a whole prompt attends
    over its own float keys and values, a reused prefix is read back from its codes; on the tiny model that
    rounding moves the logits (max |x| ~0.5) by ~0.01, a wrong prefix by 0.16 or more."""
    return 0.05 if gen.float_prefill is not None else 1e-5


def test_a_prompt_reuses_the_longest_cached_prefix_and_gets_the_same_logits(gen):
    """From a running row (copied), from its own freed row (in place), from a freed row elsewhere (copied),
    never the whole prompt (its last token makes the logits); each result equals a prefill from nothing."""
    fresh = make_slots(gen, slots=1, max_length=32, reuse_prefixes=False)
    atol = reuse_atol(gen)

    def alone(prompt):
        fresh.free(0)
        return fresh.prefill(0, prompt).copy()

    slots = make_slots(gen, slots=3, max_length=32)
    first, second, third = SHARED + [1, 2, 3], SHARED + [4, 5], SHARED[:6] + [9]
    np.testing.assert_allclose(slots.prefill(0, first), alone(first), atol=atol)
    assert slots.last_cached == 0
    np.testing.assert_allclose(slots.prefill(1, second), alone(second), atol=atol)  # row 0 runs: copied
    assert slots.last_cached == len(SHARED)
    token = int(np.argmax(slots.decode(np.array([7, 8]))[1]))
    slots.free(1)
    np.testing.assert_allclose(slots.prefill(1, second + [8, token]), alone(second + [8, token]), atol=atol)
    assert slots.last_cached == len(second) + 1  # its own freed row, in place, decoded token included
    slots.free(0)
    np.testing.assert_allclose(slots.prefill(2, third), alone(third), atol=atol)
    assert slots.last_cached == 6
    slots.free(2)
    np.testing.assert_allclose(slots.prefill(2, list(first)), alone(first), atol=atol)  # all cached but the last
    assert slots.last_cached == len(first) - 1


def test_a_reused_prefix_decodes_as_if_prefilled_whole(gen):
    """Fed the same tokens, a row that reused a prefix and one prefilled whole give the same logits at every step."""
    atol = reuse_atol(gen)
    slots = make_slots(gen, slots=2, max_length=32)
    slots.prefill(0, SHARED + [1])
    whole = make_slots(gen, slots=1, max_length=32, reuse_prefixes=False)
    prompt = SHARED + [2, 3]
    reused, alone = slots.prefill(1, prompt).copy(), whole.prefill(0, prompt).copy()
    assert slots.last_cached == len(SHARED)
    for _ in range(5):
        np.testing.assert_allclose(reused, alone, atol=atol)
        token = int(np.argmax(alone))
        reused, alone = slots.decode(np.array([1, token]))[1].copy(), whole.decode(np.array([token]))[0].copy()
    np.testing.assert_allclose(reused, alone, atol=atol)


def test_moves_carry_the_prefix_and_reuse_can_be_turned_off(gen):
    slots = make_slots(gen, slots=2, max_length=32)
    slots.prefill(0, [1, 2])
    slots.prefill(1, SHARED)
    slots.free(0)
    slots.move(1, 0)
    assert slots.tokens[0] == SHARED
    slots.prefill(1, SHARED + [3])  # the old row 1 still holds SHARED too; itself wins the tie, in place
    assert slots.last_cached == len(SHARED)
    off = make_slots(gen, slots=2, max_length=32, reuse_prefixes=False)
    off.prefill(0, SHARED)
    off.prefill(1, SHARED + [3])
    assert off.last_cached == 0
    off.free(0)
    off.free(1)
    off.forget()
    assert off.tokens == [[], []]


def test_row_copy_graph_copies_whole_rows_and_nothing_else():
    """The device path's copy (runtime.serve.row_copy), run on the CPU: row src lands on row dst exactly."""
    import onnxruntime as ort

    from runtime.serve.row_copy import RowCopy

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 2, 5, 4)).astype(np.float16) for _ in range(4)]
    before = [a.copy() for a in arrays]
    copy = RowCopy([ort.OrtValue.ortvalue_from_numpy(a) for a in arrays], np.dtype(np.float16), "cpu")
    copy(2, 0)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a[0], b[2])
        np.testing.assert_array_equal(a[1:], b[1:])
    copy(0, 1)  # a second pair gets its own binding; the first stays bound
    assert set(copy._bindings) == {(2, 0), (0, 1)}
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a[1], b[2])


@pytest.mark.parametrize("kind", ["float", "int8-kernel"])
def test_copies_on_the_device_path_give_what_host_copies_give(kind, request):
    """A cache in GPU memory copies rows with a graph instead of numpy; forced on here, moves and reused
    prefixes must give bit for bit the logits of the host path."""
    folder = request.getfixturevalue("tiny_export" if kind == "float" else "tiny_export_int8_kv")
    gen = Generator(folder, provider="cpu", graph="fused", float_prefill=False)

    def scenario(copy_on_device: bool) -> list[np.ndarray]:
        slots = SlotCache(gen.session, gen.contract, 3, 32, copy_on_device=copy_on_device)
        out = [slots.prefill(0, SHARED + [1]).copy(), slots.prefill(1, [5, 6, 7]).copy()]
        out.append(slots.prefill(2, SHARED + [2, 3]).copy())  # prefix copied from row 0
        assert slots.last_cached == len(SHARED)
        out.append(slots.decode(np.array([4, 8, 9])).copy())
        slots.free(0)
        slots.move(2, 0)  # the last row fills the hole
        for _ in range(3):
            out.append(slots.decode(np.array([int(np.argmax(out[-1][2 if len(out) == 4 else 0])), 1])).copy())
        return out

    for host, device in zip(scenario(False), scenario(True)):
        np.testing.assert_array_equal(host, device)
