"""Running the fused graph: right-padded prompts and a preallocated KV cache updated in place.

Each step binds the cache buffers as both past and present (IO binding), so nothing is copied
or allocated for the cache between steps. A prefill is GroupQueryAttention's "first prompt"
(`total_sequence_length` = the padded width, each row's own length in `seqlens_k`); a decode step
feeds one token to every row of the buffer, and a row whose sequence has finished is fed the pad
token and ignored, so the batch keeps its shape.

On CUDA with `cuda_graph=True` (the runner's default there), decode steps read their inputs from device buffers at fixed
addresses and write the logits to another, so ONNX Runtime captures the step once per batch size
and cache and replays it: one graph launch per token instead of one launch per kernel.

`greedy=True` (every row greedy) returns each row's argmax token instead of its logits. On CUDA the
argmax runs on the device (runtime.greedy_pick), so a step copies one int64 per row to the host
instead of batch × vocabulary float32 logits.

With an int8 cache, `prefill` runs the prompts through the float-cache twin graph and rounds their
keys and values into the cache (runtime.float_prefill); `logits` (teacher forcing, validation) stays
on the int8 graph, so every position reads the codes, as every generated token does.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeFailure
from runtime.float_prefill import FloatPrefill
from runtime.greedy_pick import DeviceArgmax
from runtime.io_spec import Contract
from runtime.kv_cache import StaticKVCache

_GRAPH_IDS = itertools.count(1)  # ONNX Runtime keys captured CUDA graphs by id: a new one per cache


@dataclass
class FusedState:
    cache: StaticKVCache
    rows: np.ndarray  # buffer rows still generating, in the order of the tokens fed to decode


class FusedGraph:
    def __init__(
        self,
        session: ort.InferenceSession,
        contract: Contract,
        pad_id: int,
        device: str = "cpu",
        max_length: int | None = None,
        cuda_graph: bool = False,
        float_prefill: FloatPrefill | None = None,
    ):
        self.session, self.contract, self.pad_id, self.device = session, contract, pad_id, device
        self.float_prefill = float_prefill  # int8 cache: prompts run through the float-cache graph
        self.max_length = max_length  # None: each generate sizes the cache to its prompts plus new tokens
        self.cuda_graph = cuda_graph
        self._cache: StaticKVCache | None = None
        self._binding: ort.IOBinding | None = None
        self._logits: dict[int, tuple[np.ndarray | None, ort.OrtValue]] = {}  # batch -> reused one-row logits buffer
        self._step: dict[str, ort.OrtValue] = {}  # cuda_graph: the decode step's fixed device buffers
        self._run_options = {}  # "prefill" / "decode" -> RunOptions naming the CUDA graph to capture or replay
        self._argmax: DeviceArgmax | None = None  # greedy tokens picked on the device, built on first use
        self.session_seconds = 0.0  # time inside session.run, for the bench's overhead figure

    def cache_for(self, batch: int, length: int) -> StaticKVCache:
        """The preallocated cache, reused while batch and length fit; a new one otherwise."""
        if self.max_length is not None:
            if length > self.max_length:
                raise RuntimeFailure(f"prompt plus new tokens ({length}) exceed max_length {self.max_length}")
            length = self.max_length
        if self._cache is None or not self._cache.fits(batch, length):
            self._cache = self._binding = None  # free the old buffers first
            self._step = {}
            self._cache = StaticKVCache(self.contract, batch, length, self.device)
            self._binding = self.session.io_binding()  # the cache is bound once; each step rebinds its small inputs
            for name, value in self._cache.values.items():
                if name.startswith("past_"):
                    self._binding.bind_ortvalue_input(name, value)
                else:
                    self._binding.bind_ortvalue_output(name, value)
            if self.cuda_graph:
                self._bind_decode_buffers(batch, self._cache.max_length)
        self._cache.lengths[:] = 0
        return self._cache

    def _bind_decode_buffers(self, batch: int, max_length: int) -> None:
        """Device buffers for the decode step's inputs and logits, and a fresh CUDA graph id."""

        def device(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype), "cuda", 0)

        self._step = {
            "input_ids": device((batch, 1), np.int64),
            "seqlens_k": device((batch,), np.int32),
            "logits_positions": ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), "cuda", 0),
            "logits": device((batch, 1, self.contract.vocab_size), np.float32),
            # a CPU input of GroupQueryAttention: constant across decode steps, so the captured graph stays valid
            "total_sequence_length": ort.OrtValue.ortvalue_from_numpy(np.array(max_length, np.int32)),
        }
        prefill, decode = ort.RunOptions(), ort.RunOptions()
        prefill.add_run_config_entry("gpu_graph_id", "-1")  # prompts change shape: never captured
        decode.add_run_config_entry("gpu_graph_id", str(next(_GRAPH_IDS)))
        self._run_options = {"prefill": prefill, "decode": decode}

    def run(
        self,
        input_ids: np.ndarray,
        cache: StaticKVCache,
        positions: np.ndarray,
        prompt_lengths: np.ndarray | None = None,
        greedy: bool = False,
    ) -> np.ndarray:
        """A prefill of right-padded prompts [B, S] into an empty cache (`prompt_lengths` [B] real tokens),
        or, without `prompt_lengths`, a decode step (S = 1, one token for every row).
        Returns the logits at `positions` [B, P] of the chunk: [B, P, V]; with `greedy`, their argmax [B, P]."""
        batch, width = input_ids.shape
        decode = prompt_lengths is None
        if not decode and cache.lengths.any():
            raise RuntimeFailure("a prompt can only be run into an empty cache")
        if decode and self._step:
            return self._replay_decode(input_ids, cache, greedy)
        binding = self._binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("logits_positions", np.ascontiguousarray(positions, dtype=np.int64))
        total = cache.lengths + 1 if decode else prompt_lengths.astype(np.int32)
        binding.bind_cpu_input("seqlens_k", (total - 1).astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(cache.max_length if decode else width, dtype=np.int32))
        host, logits = self._logits_buffer(batch, positions.shape[1])
        binding.bind_ortvalue_output("logits", logits)
        started = time.perf_counter()
        self.session.run_with_iobinding(binding, self._run_options.get("prefill"))
        self.session_seconds += time.perf_counter() - started
        cache.lengths[:] = total
        if host is not None:
            return host.argmax(-1) if greedy else host
        return self._pick(logits) if greedy else logits.numpy()

    def _replay_decode(self, input_ids: np.ndarray, cache: StaticKVCache, greedy: bool) -> np.ndarray:
        """A decode step through the fixed device buffers (captured on first use, replayed after)."""
        step, binding = self._step, self._binding
        step["input_ids"].update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        step["seqlens_k"].update_inplace(cache.lengths.astype(np.int32))  # lengths after the step, minus one
        for name in ("input_ids", "seqlens_k", "logits_positions", "total_sequence_length"):
            binding.bind_ortvalue_input(name, step[name])
        binding.bind_ortvalue_output("logits", step["logits"])
        started = time.perf_counter()
        self.session.run_with_iobinding(binding, self._run_options["decode"])
        self.session_seconds += time.perf_counter() - started
        cache.lengths += 1
        return self._pick(step["logits"]) if greedy else step["logits"].numpy()

    def _pick(self, logits: ort.OrtValue) -> np.ndarray:
        """Argmax of device logits, on the device; its run counts as session time."""
        if self._argmax is None:
            self._argmax = DeviceArgmax(self.device)
        started = time.perf_counter()
        tokens = self._argmax(logits)
        self.session_seconds += time.perf_counter() - started
        return tokens

    def _logits_buffer(self, batch: int, rows: int) -> tuple[np.ndarray | None, ort.OrtValue]:
        """Where the logits go: on the CPU a host array (no per-step wrapping of every output), on
        CUDA a device buffer copied back after the run. Reused across steps for one row per
        sequence (the caller consumes it before the next step), fresh otherwise."""
        if rows == 1 and batch in self._logits:
            return self._logits[batch]
        shape = (batch, rows, self.contract.vocab_size)
        if self.device == "cpu":
            array = np.empty(shape, dtype=np.float32)
            pair = (array, ort.OrtValue.ortvalue_from_numpy(array))
        else:
            pair = (None, ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0))
        if rows == 1:
            self._logits = {batch: pair}
        return pair

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Logits [T, V] of one sequence from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)[None]
        cache = self.cache_for(1, ids.shape[1])
        return self.run(ids, cache, np.arange(ids.shape[1])[None], np.array([ids.shape[1]]))[0]

    def prefill(self, prompts: list[list[int]], room: int = 0) -> tuple[np.ndarray, FusedState]:
        """Right-pad and run the prompts into a cache with `room` positions left after the longest;
        returns (each prompt's last logits [B, V], state)."""
        lengths = np.array([len(p) for p in prompts], dtype=np.int32)
        width = int(lengths.max())
        input_ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        for row, ids in enumerate(prompts):
            input_ids[row, : len(ids)] = ids
        cache = self.cache_for(len(prompts), width + room)
        if self.float_prefill is not None:
            started = time.perf_counter()
            logits = self.float_prefill.run(input_ids, lengths, (lengths - 1)[:, None], cache.host)
            self.session_seconds += time.perf_counter() - started
            cache.lengths[:] = lengths
        else:
            logits = self.run(input_ids, cache, (lengths - 1)[:, None], lengths)
        return logits[:, 0].copy(), FusedState(cache, np.arange(len(prompts)))

    def decode(self, tokens: np.ndarray, state: FusedState, greedy: bool = False) -> np.ndarray:
        """tokens [R] for the rows still generating -> their logits [R, V], or with `greedy` their
        argmax tokens [R]. Finished rows are fed the pad token (their cache grows unread), so every
        step has the same shape."""
        cache = state.cache
        if int(cache.lengths.max()) >= cache.max_length:
            raise RuntimeFailure(f"the KV cache is full ({cache.max_length} positions); raise max_length")
        input_ids = np.full((cache.batch, 1), self.pad_id, dtype=np.int64)
        input_ids[state.rows, 0] = tokens
        return self.run(input_ids, cache, np.zeros((cache.batch, 1), dtype=np.int64), greedy=greedy)[state.rows, 0]

    def keep(self, state: FusedState, rows: np.ndarray) -> None:
        state.rows = state.rows[rows]
