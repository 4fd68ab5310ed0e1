"""The fused graph through the runner: in-place KV buffers, ragged batches equal to one-by-one,
finished rows fed padding without disturbing the others, and a readable error when the cache is too small."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime import Generator, RuntimeFailure

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]


@pytest.fixture()
def fused(tiny_export):
    return Generator(tiny_export, provider="cpu", graph="fused")


def test_auto_picks_the_fused_graph(tiny_export):
    assert Generator(tiny_export, provider="cpu").flavour == "fused"
    assert Generator(tiny_export, provider="cpu", graph="portable").flavour == "portable"


def test_batched_greedy_equals_one_at_a_time_and_the_portable_graph(fused, tiny_export):
    batched = fused.generate(PROMPTS, 12, ignore_eos=True).tokens
    single = [fused.generate([p], 12, ignore_eos=True).tokens[0] for p in PROMPTS]
    portable = Generator(tiny_export, provider="cpu", graph="portable").generate(PROMPTS, 12, ignore_eos=True).tokens
    assert batched == single == portable


def test_int8_kv_cache_runs_batched_like_one_at_a_time_in_a_quarter_of_the_memory(tiny_export_int8_kv, tiny_export):
    gen = Generator(tiny_export_int8_kv, provider="cpu", graph="fused")
    assert gen.contract.kv_dtype == "int8"
    assert gen.contract.kv_bytes_per_token() * 4 == Generator(tiny_export, provider="cpu").contract.kv_bytes_per_token()
    batched = gen.generate(PROMPTS, 12, ignore_eos=True).tokens
    assert batched == [gen.generate([p], 12, ignore_eos=True).tokens[0] for p in PROMPTS]
    assert {b.dtype for b in gen.graph._cache.host} == {np.dtype(np.int8)}


def test_an_int8_cache_takes_prompts_through_its_float_twin_graph(tiny_export_int8_kv):
    """The export writes the float-cache graph beside the int8 one, reading the same weights file. The codes
    it rounds match the int8 kernel's bit for bit where both see the same keys and values (layer 0, whose
    inputs are the embeddings); deeper layers differ only by the prompt's attention, float against codes."""
    from runtime.fused import FusedGraph

    gen = Generator(tiny_export_int8_kv, provider="cpu", graph="fused")
    folder = tiny_export_int8_kv / "fused"
    assert gen.float_prefill is not None and gen.contract.prefill_model_file == "model_prefill.onnx"
    assert sorted(p.name for p in folder.glob("*.data")) == ["model.onnx.data"]  # one copy of the weights
    prefill_graph = gen.float_prefill.session
    assert {i.type for i in prefill_graph.get_inputs() if i.name.startswith("past_")} == {"tensor(float)"}

    prompts = [PROMPTS[0], PROMPTS[2]]
    logits, state = gen.prefill(prompts)
    hybrid = [b.copy() for b in state.cache.host]
    kernel = FusedGraph(gen.session, gen.contract, gen.pad_id)  # the int8 graph rounding its own prompt
    kernel_logits, kernel_state = kernel.prefill(prompts)
    for row, prompt in enumerate(prompts):
        for name in (0, 1):  # layer 0's key and value
            np.testing.assert_array_equal(
                hybrid[name][row, :, : len(prompt)], kernel_state.cache.host[name][row, :, : len(prompt)]
            )
        deeper = np.abs(
            hybrid[-1][row, :, : len(prompt)].astype(int) - kernel_state.cache.host[-1][row, :, : len(prompt)]
        )
        assert deeper.max() <= 8  # a few steps of 127 at most: the same values, attended a little differently
    np.testing.assert_allclose(logits, kernel_logits, atol=0.05)


def test_rows_stop_on_their_own_limit(fused):
    """A finished row keeps its place in the buffer, fed the pad token; the rows still going are
    unaffected: their logits equal those of a batch in which nothing finished."""
    logits, state = fused.prefill(PROMPTS, room=4)
    first = np.argmax(logits, -1)
    fused.decode(first, state)
    fused.graph.keep(state, np.array([0, 2]))  # row 1 finished
    lengths = state.cache.lengths.copy()
    out = fused.decode(np.array([1, 2]), state)
    assert out.shape == (2, fused.contract.vocab_size)
    assert state.cache.lengths.tolist() == (lengths + 1).tolist()
    logits, state = fused.prefill(PROMPTS, room=4)
    fused.decode(first, state)
    everyone = fused.decode(np.array([1, 9, 2]), state)
    np.testing.assert_allclose(out, everyone[[0, 2]], atol=1e-5)


def test_kv_buffer_is_allocated_once_and_updated_in_place(fused):
    fused.generate([PROMPTS[0]], 6, ignore_eos=True)
    cache = fused.graph._cache
    pointers = {name: value.data_ptr() for name, value in cache.values.items()}
    first = cache.values["present.0.key"].numpy().copy()
    fused.generate([PROMPTS[0] + [3]], 5, ignore_eos=True)  # same batch, fits: the same buffers
    assert fused.graph._cache is cache
    assert {name: value.data_ptr() for name, value in cache.values.items()} == pointers
    assert cache.values["past_key_values.0.key"].data_ptr() == cache.values["present.0.key"].data_ptr()
    assert not np.array_equal(first, cache.values["present.0.key"].numpy())  # written in place


def test_cuda_graph_default_follows_provider_and_graph(tiny_export):
    """None (the default) means on only for CUDA with the fused graph: here, off either way."""
    assert Generator(tiny_export, provider="cpu").cuda_graph is False
    assert Generator(tiny_export, provider="auto", graph="portable").cuda_graph is False
    assert Generator(tiny_export, provider="cpu", cuda_graph=False).cuda_graph is False


def test_decode_logits_buffer_is_reused_across_steps(tiny_export):
    gen = Generator(tiny_export, provider="cpu", graph="fused")
    logits, state = gen.prefill([PROMPTS[0]], 4)
    first = gen.graph._logits_buffer(1, 1)
    gen.decode(logits.argmax(-1), state)
    gen.decode(logits.argmax(-1), state)
    assert gen.graph._logits_buffer(1, 1) is first  # one buffer per batch size, not one per step


def test_auto_keeps_a_float32_fused_graph_off_a_gpu_and_says_why(tiny_export, monkeypatch):
    """CUDA's GroupQueryAttention runs float16 only: on a GPU machine "auto" must not pick CUDA for a float32
    fused graph (its attention would fall back and the placement check fail); it runs on the CPU and says so."""
    import json

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    gen = Generator(tiny_export, provider="auto", graph="fused")
    assert gen.provider == "CPUExecutionProvider" and gen.device == "cpu"
    assert "auto took the CPU: this fused graph is float32" in gen.describe_settings()
    assert Generator(tiny_export, provider="cpu", graph="fused").provider_reason is None
    contract = json.loads((tiny_export / "fused" / "io_contract.json").read_text())
    assert contract["dtype"] == "float32"


def test_cuda_graph_is_refused_without_cuda(tiny_export):
    with pytest.raises(RuntimeFailure, match="cuda_graph needs the cuda provider"):
        Generator(tiny_export, provider="cpu", cuda_graph=True)
    with pytest.raises(RuntimeFailure, match="cuda_graph needs the fused graph"):
        Generator(tiny_export, provider="cpu", graph="portable", cuda_graph=True)


def test_full_cache_and_explicit_max_length_are_readable_errors(tiny_export):
    small = Generator(tiny_export, provider="cpu", graph="fused", max_length=8)
    with pytest.raises(RuntimeFailure, match="exceed max_length 8"):
        small.generate([PROMPTS[0]], 4)
    with pytest.raises(RuntimeFailure, match="exceeds the model's"):
        Generator(tiny_export, provider="cpu", graph="fused", max_length=10_000).generate([[1]], 1)


def test_a_device_cache_that_cannot_be_allocated_is_a_readable_error(tiny_export, monkeypatch):
    """Off the CPU there is no free-memory check before allocating: the allocator's failure (out of GPU
    memory; here, no CUDA in this onnxruntime) becomes one line naming the cache's size and the knobs."""
    from runtime.io_spec import Contract
    from runtime.kv_cache import StaticKVCache

    def out_of_memory(*args):
        raise RuntimeError("CUDA failure 2: out of memory")

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", out_of_memory)
    contract = Contract.load(tiny_export / "fused")
    with pytest.raises(
        RuntimeFailure,
        match=r"the KV cache \(\d+ MiB\) could not be allocated on cuda: CUDA failure 2: "
        r"out of memory; lower max_length .* --kv-budget-mb",
    ):
        StaticKVCache(contract, 8, 256, "cuda")


def test_missing_fused_graph_is_named(tiny_export, tmp_path):
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    shutil.rmtree(copy / "fused")
    with pytest.raises(RuntimeFailure, match=r"fused/.*: missing \(listed in manifest.json\)"):
        Generator(copy, provider="cpu")  # the manifest says it had one: damaged
    (copy / "manifest.json").unlink()  # a folder exported without it
    with pytest.raises(RuntimeFailure, match="no fused graph"):
        Generator(copy, provider="cpu", graph="fused")
    assert Generator(copy, provider="cpu").flavour == "portable"


def test_returned_logits_are_not_overwritten_by_the_next_step(fused):
    """The runner reuses one host buffer for per-step logits; what it hands out must stay as it was."""
    first, state = fused.prefill(PROMPTS, room=3)
    kept = first.copy()
    second = fused.decode(np.argmax(first, -1), state)
    kept_second = second.copy()
    fused.decode(np.argmax(second, -1), state)
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(second, kept_second)


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_greedy_decode_returns_the_argmax_of_the_logits_it_replaces(tiny_export, graph):
    """`decode(..., greedy=True)` hands back tokens instead of logits (on CUDA picked on the device);
    they must be the logits' argmax, also after a row has finished."""
    logits_gen = Generator(tiny_export, provider="cpu", graph=graph)
    greedy_gen = Generator(tiny_export, provider="cpu", graph=graph)
    logits, a = logits_gen.prefill(PROMPTS, room=6)
    _, b = greedy_gen.prefill(PROMPTS, room=6)
    tokens = logits.argmax(-1)
    for step in range(5):
        if step == 2:  # the middle row finishes
            for gen, state in ((logits_gen, a), (greedy_gen, b)):
                gen.graph.keep(state, np.array([0, 2]))
            tokens = tokens[[0, 2]]
        expected = logits_gen.decode(tokens, a).argmax(-1)
        picked = greedy_gen.decode(tokens, b, greedy=True)
        np.testing.assert_array_equal(picked, expected)
        tokens = expected


def test_device_argmax_matches_numpy_including_ties():
    import onnxruntime as ort

    from runtime.greedy_pick import DeviceArgmax

    logits = np.random.default_rng(0).standard_normal((3, 2, 50)).astype(np.float32)
    logits[1, 0, [7, 30]] = 9.0  # a tie: the first index wins, as in numpy
    picked = DeviceArgmax("cpu")(ort.OrtValue.ortvalue_from_numpy(logits))
    assert picked.shape == (3, 2) and picked.dtype == np.int64
    np.testing.assert_array_equal(picked, logits.argmax(-1))
    assert picked[1, 0] == 7
