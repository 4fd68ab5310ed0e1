import numpy as np
import pytest

from runtime.sampling import SamplingParams, logits_to_probs, sample


def test_greedy_is_argmax():
    assert sample(np.array([0.1, 3.0, 2.0]), SamplingParams(), np.random.default_rng(0)) == 1


def test_top_k_keeps_only_k_tokens():
    probs = logits_to_probs(np.array([1.0, 2.0, 3.0, 4.0]), temperature=1.0, top_k=2)
    assert probs[:2].sum() == 0 and probs.sum() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.7)
    assert np.count_nonzero(probs) == 2
    np.testing.assert_allclose(probs[:2], [0.5 / 0.8, 0.3 / 0.8])


def test_low_temperature_approaches_greedy_and_seed_repeats():
    logits = np.array([1.0, 1.2, 0.9])
    draws = [sample(logits, SamplingParams(temperature=0.01, seed=1), np.random.default_rng(i)) for i in range(20)]
    assert set(draws) == {1}
    p = SamplingParams(temperature=1.0)
    a = [sample(logits, p, np.random.default_rng(5)) for _ in range(5)]
    assert a == [sample(logits, p, np.random.default_rng(5)) for _ in range(5)]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def _full_sort_nucleus(logits, temperature, top_k, top_p):
    """The textbook filter: sort the whole vocabulary, keep the top k, then the smallest prefix reaching top_p."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    order = np.argsort(-probs, kind="stable")[: top_k or None]
    p = probs[order] / probs[order].sum()
    keep = np.cumsum(p) - p < top_p
    return set(order[keep].tolist())


@pytest.mark.parametrize(
    "scale,top_k,top_p", [(1.0, 0, 0.9), (8.0, 0, 0.95), (3.0, 50, 0.8), (0.5, 0, 0.99), (2.0, 0, 1.0)]
)
def test_the_partial_search_keeps_the_same_nucleus_as_a_full_sort(scale, top_k, top_p):
    logits = np.random.default_rng(3).normal(size=5000).astype(np.float32) * scale
    probs = logits_to_probs(logits, 0.7, top_k, top_p)
    assert set(np.flatnonzero(probs).tolist()) == _full_sort_nucleus(logits, 0.7, top_k, top_p)
    assert probs.sum() == pytest.approx(1.0)


def test_draws_follow_the_filtered_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(1)
    counts = np.bincount([sample(logits, SamplingParams(temperature=1.0), rng) for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    nucleus = [sample(logits, SamplingParams(temperature=1.0, top_p=0.7), rng) for _ in range(2000)]
    assert set(nucleus) == {0, 1}
