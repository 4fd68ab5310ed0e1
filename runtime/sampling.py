"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a seeded RNG."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: the argmax, whatever top_k and top_p say."""
        return self.temperature == 0


def candidates(
    logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """logits [V] -> (token ids, their probabilities summing to 1) left after temperature, top-k and
    nucleus (top-p) filtering. The nucleus is sought among the few hundred most likely tokens,
    widening only when they hold less than top_p: a full sort of a 50k-token vocabulary costs
    2 ms per token, as much as a decode step of a small model."""
    logits = logits.astype(np.float64) / max(temperature, 1e-5)
    probs = np.exp(logits - logits.max())
    ids = np.argpartition(-probs, top_k - 1)[:top_k] if 0 < top_k < len(probs) else np.arange(len(probs))
    pool = probs[ids] / probs[ids].sum()
    if top_p >= 1.0:
        return ids, pool
    k = min(len(pool), 256)
    while True:
        best = np.argpartition(-pool, k - 1)[:k] if k < len(pool) else np.arange(len(pool))
        if k == len(pool) or pool[best].sum() >= top_p:
            break
        k = min(len(pool), k * 8)
    best = best[np.argsort(-pool[best], kind="stable")]
    kept = pool[best]
    n = int(np.count_nonzero(np.cumsum(kept) - kept < top_p))  # the smallest prefix whose mass reaches top_p
    return ids[best[:n]], kept[:n] / kept[:n].sum()


def logits_to_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """logits: [V] -> probabilities [V] after temperature, top-k and nucleus (top-p) filtering."""
    ids, kept = candidates(logits, temperature, top_k, top_p)
    probs = np.zeros(logits.shape[-1], dtype=np.float64)
    probs[ids] = kept
    return probs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits: [V] -> one token id."""
    if params.greedy:
        return int(np.argmax(logits))
    ids, probs = candidates(logits, params.temperature, params.top_k, params.top_p)
    cdf = np.cumsum(probs)  # inverse-CDF draw: rng.choice(p=...) re-validates p at every call
    return int(ids[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(ids) - 1)])
