"""Running the fused graph: right-padded prompts and a preallocated KV cache updated in place.

Each step binds the cache buffers as both past and present (IO binding), so nothing is copied
or allocated for the cache between steps. Every row of the batch keeps its own length: a row whose
sequence has finished stays in the buffer and is fed `query_seqlens = 0`, which leaves its cache as
it is while the other rows go on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeFailure
from runtime.io_spec import Contract
from runtime.kv_cache import StaticKVCache


@dataclass
class FusedState:
    cache: StaticKVCache
    rows: np.ndarray  # buffer rows still generating, in the order of the tokens fed to decode


class FusedGraph:
    def __init__(self, session: ort.InferenceSession, contract: Contract, pad_id: int, device: str = "cpu",
                 max_length: int | None = None):
        self.session, self.contract, self.pad_id, self.device = session, contract, pad_id, device
        self.max_length = max_length  # None: each generate sizes the cache to its prompts plus new tokens
        self._cache: StaticKVCache | None = None
        self._binding: ort.IOBinding | None = None
        self._logits: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}  # CPU: batch -> reused one-row logits buffer
        self._logits_index = len(contract.present_names())  # get_outputs() follows the binding order: presents, then logits
        self.session_seconds = 0.0  # time inside session.run, for the bench's overhead figure

    def cache_for(self, batch: int, length: int) -> StaticKVCache:
        """The preallocated cache, reused while batch and length fit; a new one otherwise."""
        if self.max_length is not None:
            if length > self.max_length:
                raise RuntimeFailure(f"prompt plus new tokens ({length}) exceed max_length {self.max_length}")
            length = self.max_length
        if self._cache is None or not self._cache.fits(batch, length):
            self._cache = self._binding = None  # free the old buffers first
            self._cache = StaticKVCache(self.contract, batch, length, self.device)
            self._binding = self.session.io_binding()  # the cache is bound once; each step rebinds its small inputs
            for name, value in self._cache.values.items():
                if name.startswith("past_"):
                    self._binding.bind_ortvalue_input(name, value)
                else:
                    self._binding.bind_ortvalue_output(name, value)
        self._cache.lengths[:] = 0
        return self._cache

    def run(self, input_ids: np.ndarray, new: np.ndarray, cache: StaticKVCache, positions: np.ndarray) -> np.ndarray:
        """Append `new[b]` real tokens of row b (right-padded input_ids [B, S]); returns the logits
        at `positions` [B, P] of the chunk: [B, P, V]."""
        binding = self._binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("logits_positions", np.ascontiguousarray(positions, dtype=np.int64))
        total = cache.lengths + new
        binding.bind_cpu_input("seqlens_k", (total - 1).astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(cache.max_length, dtype=np.int32))
        binding.bind_cpu_input("query_seqlens", new.astype(np.int32))
        if self.device == "cpu":  # straight into a host array: no per-step wrapping of every output
            logits = self._host_logits(input_ids.shape[0], positions.shape[1])
            binding.bind_ortvalue_output("logits", logits[1])
        else:
            binding.bind_output("logits", self.device)
        started = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.session_seconds += time.perf_counter() - started
        cache.lengths[:] = total
        if self.device == "cpu":
            return logits[0]
        return binding.get_outputs()[self._logits_index].numpy()

    def _host_logits(self, batch: int, rows: int) -> tuple[np.ndarray, ort.OrtValue]:
        """A host buffer for the logits: reused across steps for one row per sequence (the caller
        consumes it before the next step), fresh otherwise."""
        if rows == 1 and batch in self._logits:
            return self._logits[batch]
        array = np.empty((batch, rows, self.contract.vocab_size), dtype=self.contract.dtype)
        pair = (array, ort.OrtValue.ortvalue_from_numpy(array))
        if rows == 1:
            self._logits = {batch: pair}
        return pair

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Logits [T, V] of one sequence from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)[None]
        cache = self.cache_for(1, ids.shape[1])
        return self.run(ids, np.array([ids.shape[1]]), cache, np.arange(ids.shape[1])[None])[0]

    def prefill(self, prompts: list[list[int]], room: int = 0) -> tuple[np.ndarray, FusedState]:
        """Right-pad and run the prompts into a cache with `room` positions left after the longest;
        returns (each prompt's last logits [B, V], state)."""
        lengths = np.array([len(p) for p in prompts])
        width = int(lengths.max())
        input_ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        for row, ids in enumerate(prompts):
            input_ids[row, : len(ids)] = ids
        cache = self.cache_for(len(prompts), width + room)
        logits = self.run(input_ids, lengths, cache, (lengths - 1)[:, None])
        return logits[:, 0].copy(), FusedState(cache, np.arange(len(prompts)))

    def decode(self, tokens: np.ndarray, state: FusedState) -> np.ndarray:
        """tokens [R] for the rows still generating -> their logits [R, V]."""
        cache = state.cache
        if int(cache.lengths[state.rows].max()) >= cache.max_length:
            raise RuntimeFailure(f"the KV cache is full ({cache.max_length} positions); raise max_length")
        input_ids = np.full((cache.batch, 1), self.pad_id, dtype=np.int64)
        input_ids[state.rows, 0] = tokens
        new = np.zeros(cache.batch, dtype=np.int32)
        new[state.rows] = 1
        return self.run(input_ids, new, cache, np.zeros((cache.batch, 1), dtype=np.int64))[state.rows, 0]

    def keep(self, state: FusedState, rows: np.ndarray) -> None:
        state.rows = state.rows[rows]
