"""Running the portable graph: left-padded prompts, an attention mask, and a KV cache that the
graph returns grown by one position each step (past + new -> present)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from runtime.io_spec import Contract
from runtime.kv_cache import KVCache


@dataclass
class PortableState:
    cache: KVCache
    mask: np.ndarray  # [B, past + new] attention mask of the rows still generating


class PortableGraph:
    def __init__(self, session: ort.InferenceSession, contract: Contract, pad_id: int):
        self.session, self.contract, self.pad_id = session, contract, pad_id
        self.session_seconds = 0.0  # time inside session.run, for the bench's overhead figure

    def run(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        """One graph run; updates the cache and returns logits [B, T, V]."""
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, **cache.feeds()}
        started = time.perf_counter()
        logits, *presents = self.session.run(None, feeds)
        self.session_seconds += time.perf_counter() - started
        cache.update(presents)
        return logits

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Logits [T, V] of one sequence from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)[None]
        mask = np.ones_like(ids)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        return self.run(ids, mask, positions, KVCache(self.contract, 1))[0]

    def prefill(self, prompts: list[list[int]], room: int = 0) -> tuple[np.ndarray, PortableState]:
        """Left-pad and run the prompts; returns (last-position logits [B, V], state). `room` is unused:
        this cache grows as it goes."""
        width = max(len(p) for p in prompts)
        input_ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = ids
            mask[row, width - len(ids) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # pads sit at 0; real tokens count from 0
        cache = KVCache(self.contract, len(prompts))
        logits = self.run(input_ids, mask, positions, cache)
        return logits[:, -1, :], PortableState(cache, mask)

    def decode(self, tokens: np.ndarray, state: PortableState, greedy: bool = False) -> np.ndarray:
        """tokens [B] (one per row still generating) -> logits [B, V], or with `greedy` their argmax [B]."""
        state.mask = np.concatenate([state.mask, np.ones((state.mask.shape[0], 1), dtype=np.int64)], axis=1)
        positions = (state.mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        logits = self.run(tokens[:, None].astype(np.int64), state.mask, positions, state.cache)[:, -1, :]
        return logits.argmax(-1) if greedy else logits

    def keep(self, state: PortableState, rows: np.ndarray) -> None:
        """Keep only the given rows of the batch (the sequences still generating)."""
        state.cache.select(rows)
        state.mask = state.mask[rows]
