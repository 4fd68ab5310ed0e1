"""Prefill and decode through ONNX Runtime, with the KV cache carried between steps.

    prompts ──pad left──► prefill (past length 0) ──► logits[:, -1] ──► sample
                                                         ▲                 │
                           decode_one_token (1 token) ───┘◄── cache ◄──────┘

A batch of prompts of different lengths is padded on the left, masked, and decoded together;
a sequence that ends (EOS or its token limit) leaves the batch while the rest go on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.errors import RuntimeFailure
from runtime.io_spec import Contract
from runtime.kv_cache import KVCache
from runtime.sampling import SamplingParams, sample
from runtime.session import create_session
from runtime.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each prompt, EOS excluded
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


class Generator:
    """An exported artifact, ready to generate.

    Example:
        >>> g = Generator("artifacts/smollm2-fp32/01-export-…")             # doctest: +SKIP
        >>> ids = g.tokenizer.encode_chat("What is the capital of France?")  # doctest: +SKIP
        >>> g.tokenizer.decode(g.generate([ids], max_new_tokens=20).tokens[0])  # doctest: +SKIP
    """

    def __init__(self, folder: Path | str, provider: str = "auto", threads: int = 0):
        self.folder = Path(folder)
        try:
            self.contract = Contract.load(self.folder)
        except (FileNotFoundError, ValueError) as e:
            raise RuntimeFailure(str(e)) from e
        self.session, self.provider = create_session(self.folder, self.contract, provider, threads)
        self.tokenizer = Tokenizer(self.folder)
        gen = _read_json(self.folder / "generation_config.json")
        eos = gen.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = gen.get("pad_token_id", min(self.eos_ids) if self.eos_ids else 0)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """One graph run; updates the cache in place and returns logits [B, T, V]."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **cache.feeds()}
        logits, *presents = self.session.run(None, feeds)
        cache.update(presents)
        return logits

    def prefill(self, prompts: list[list[int]]) -> tuple[np.ndarray, KVCache, np.ndarray]:
        """Left-pad and run the prompts; returns (last-position logits [B, V], cache, attention_mask [B, T])."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeFailure("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        input_ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = ids
            mask[row, width - len(ids):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # pads sit at 0; real tokens count from 0
        cache = KVCache(self.contract, len(prompts))
        logits = self.forward(input_ids, mask, positions, cache)  # [B, T, V]
        return logits[:, -1, :], cache, mask

    def decode_one_token(self, tokens: np.ndarray, cache: KVCache, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens: [B] -> (logits [B, V], extended attention_mask)."""
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)  # [B, 1]
        logits = self.forward(tokens[:, None].astype(np.int64), mask, positions, cache)
        return logits[:, -1, :], mask

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 128,
        params: SamplingParams | list[SamplingParams] = SamplingParams(),
        on_token: Callable[[int, int], None] | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Generate for a batch of token-id prompts. `on_token(row, token_id)` streams each new token."""
        n = len(prompts)
        per_row = params if isinstance(params, list) else [params] * n
        rngs = [np.random.default_rng(p.seed) for p in per_row]
        out: list[list[int]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        result = GenerationResult(out, finish_reasons=reasons)
        if max_new_tokens <= 0:
            return result
        started = time.perf_counter()
        logits, cache, mask = self.prefill(prompts)
        result.prefill_seconds = time.perf_counter() - started
        active = np.arange(n)  # original row of each batch row still generating
        started = time.perf_counter()
        while True:
            next_tokens, keep = [], []
            for b, row in enumerate(active):
                token = sample(logits[b], per_row[row], rngs[row])
                if token in self.eos_ids and not ignore_eos:
                    reasons[row] = "stop"
                    continue
                out[row].append(token)
                if on_token:
                    on_token(int(row), token)
                if len(out[row]) < max_new_tokens:
                    next_tokens.append(token)
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                rows = np.array(keep)
                cache.select(rows)
                mask, active = mask[rows], active[rows]
            logits, mask = self.decode_one_token(np.array(next_tokens), cache, mask)
            result.decode_steps += 1
        result.decode_seconds = time.perf_counter() - started
        return result


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}
