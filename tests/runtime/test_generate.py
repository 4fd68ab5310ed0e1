"""The runner: batch equals one-by-one, stopping, sampling, streaming, provider checks."""

import subprocess
import sys

import numpy as np
import pytest

from runtime import Generator, RuntimeFailure, SamplingParams
from runtime.session import choose_provider
from runtime.tokenizer import StreamDecoder


@pytest.fixture(scope="module")
def gen(tiny_export):
    return Generator(tiny_export, provider="cpu")


def test_batch_of_mixed_length_prompts_equals_one_by_one(gen):
    prompts = [
        gen.tokenizer.encode(p)
        for p in [
            "The capital of France",
            "Once",
            "def add(a, b): return a + b. Numbers like",
            "A model that is smaller and faster is still",
        ]
    ]
    assert len({len(p) for p in prompts}) == 4
    single = [gen.generate([p], 12, ignore_eos=True).tokens[0] for p in prompts]
    batched = gen.generate(prompts, 12, ignore_eos=True).tokens
    assert batched == single
    assert all(len(t) == 12 for t in batched)


def test_each_sequence_stops_on_its_own(gen):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    first = gen.generate(prompts, 6, ignore_eos=True).tokens
    gen.eos_ids = {first[1][2]}  # make row 1 stop at its third token
    try:
        res = gen.generate(prompts, 6)
    finally:
        gen.eos_ids = set()
    assert res.finish_reasons[1] == "stop" and res.tokens[1] == first[1][:2]
    for row in (0, 2):
        stop = next((i for i, t in enumerate(first[row]) if t == first[1][2]), None)
        assert res.tokens[row] == first[row][:stop]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(gen):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = gen.generate([[5, 6, 7]], 16, params, ignore_eos=True).tokens[0]
    b = gen.generate([[5, 6, 7]], 16, params, ignore_eos=True).tokens[0]
    greedy = gen.generate([[5, 6, 7]], 16, ignore_eos=True).tokens[0]
    assert a == b and a != greedy


def test_per_sequence_sampling_settings(gen):
    greedy = SamplingParams()
    hot = SamplingParams(temperature=1.5, seed=3)
    res = gen.generate([[5, 6, 7], [5, 6, 7]], 10, [greedy, hot], ignore_eos=True).tokens
    assert res[0] == gen.generate([[5, 6, 7]], 10, ignore_eos=True).tokens[0]
    assert res[1] != res[0]


def test_streaming_callback_sees_every_token_in_order(gen):
    seen = []
    res = gen.generate([[5, 6], [7, 8, 9]], 5, on_token=lambda row, t: seen.append((row, t)), ignore_eos=True)
    for row in (0, 1):
        assert [t for r, t in seen if r == row] == res.tokens[row]


def test_stream_decoder_reassembles_the_text(gen):
    ids = gen.tokenizer.encode("The capital of France is Paris, naïve café")
    stream = StreamDecoder(gen.tokenizer)
    assert "".join(stream.push(t) for t in ids) == gen.tokenizer.decode(ids)


def test_chat_template_renders_with_generation_prompt(gen):
    text = gen.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = gen.tokenizer.encode_chat("hi")
    assert ids[0] == gen.tokenizer.token_id("<|im_start|>")


def test_eos_comes_from_the_artifact(gen, tiny_export):
    fresh = Generator(tiny_export, provider="cpu")
    assert fresh.tokenizer.token_id("<|im_end|>") in fresh.eos_ids


def test_cuda_requested_without_cuda_is_an_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the error path is for machines without it")
    with pytest.raises(RuntimeFailure, match="provider cuda requested but onnxruntime offers only"):
        choose_provider("cuda")
    assert choose_provider("auto") == "cpu"


def test_not_an_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeFailure, match="no io_contract.json"):
        Generator(tmp_path)


def test_runtime_imports_neither_torch_nor_transformers_nor_pipeline(tiny_export):
    code = (
        "import sys, runtime; from runtime import Generator; "
        f"g = Generator({str(tiny_export)!r}, provider='cpu'); g.generate([[1, 2]], 2); "
        "bad = [m for m in ('torch', 'transformers', 'pipeline') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_portable_decode_grows_cache_and_mask(tiny_export):
    gen = Generator(tiny_export, provider="cpu", graph="portable")
    logits, state = gen.prefill([[5, 6, 7], [8]])
    assert state.cache.length == 3 and state.mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    logits = gen.decode(np.array([1, 2]), state)
    assert state.cache.length == 4 and logits.shape == (2, gen.contract.vocab_size)
