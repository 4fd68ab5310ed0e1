"""Calibration text as token-id batches: the blocks every calibrated step (GPTQ, AWQ, SmoothQuant,
the sensitivity pass, int8 KV scales) runs the model on."""

from __future__ import annotations

import numpy as np
import torch

from calibration.datasets import DataError, load_text, sample_blocks
from runtime.tokenizer import Tokenizer


def calibration_batches(cal, model_dir, where: str, length: int | None = None) -> list[torch.Tensor]:
    """The calibration blocks of `cal` (a recipe's CalibrationConfig) as token-id batches [batch_size, length].

    A mix gives each source its share of the blocks by weight (largest remainders), each drawn with its own
    seed, then shuffled together with `cal.seed` so every batch mixes them. Raises DataError naming the recipe
    key `where` when a text cannot give its blocks."""
    length = length or cal.sequence_length
    tokenizer = Tokenizer(model_dir)
    if not isinstance(cal.data, tuple):
        blocks = _blocks(cal.data, tokenizer, length, cal.num_samples, cal.seed, f"{where}.data", where)
    else:
        counts = shares([part.weight for part in cal.data], cal.num_samples)
        parts = [
            _blocks(part, tokenizer, length, count, cal.seed + i, f"{where}.data[{i}]", f"{where}.data[{i}]")
            for i, (part, count) in enumerate(zip(cal.data, counts))
            if count
        ]
        blocks = np.concatenate(parts)[np.random.default_rng(cal.seed).permutation(cal.num_samples)]
    return [torch.from_numpy(blocks[i : i + cal.batch_size]) for i in range(0, len(blocks), cal.batch_size)]


def describe_text(data) -> str:
    """A calibration source, or a mix of them, in a few words for a log line."""
    parts = data if isinstance(data, tuple) else (data,)
    weight = sum(getattr(p, "weight", 1.0) for p in parts)
    return " + ".join(
        f"{p.source} {p.split}" + (f" ({getattr(p, 'weight', 1.0) / weight:.0%})" if len(parts) > 1 else "")
        for p in parts
    )


def shares(weights: list[float], total: int) -> list[int]:
    """`total` split in proportion to `weights`, whole numbers that sum to it (largest remainders first)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _blocks(src, tokenizer: Tokenizer, length: int, count: int, seed: int, data_key: str, key: str) -> np.ndarray:
    try:
        text = load_text(src.source, src.split, src.hub_config, src.text_field)
    except DataError as e:
        raise DataError(f"{data_key}: {e}") from e
    ids = np.array(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    try:
        return sample_blocks(ids, length, count, seed)
    except DataError as e:
        raise DataError(f"{key}: {e}") from e
