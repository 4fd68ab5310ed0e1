"""KV slots for continuous batching: one preallocated cache, one row per running sequence.

    cache (per layer, key and value): [slots, kv_heads, max_length, head_dim]
        row 0 │ seq A ████████░░░░ │
        row 1 │ seq C ███░░░░░░░░░ │  rows 0..k-1 run; a decode step binds the view [0:k]
        row 2 │ seq B ██████████░░ │
        row 3 │ (free)             │  a newcomer's prefill binds the view [k:k+1] and writes there

A newcomer's prompt runs as a batch-1 GroupQueryAttention prompt whose past and present are the
view of its own row, so its KV lands in place; a long one can run in chunks (`start` claims the row,
each `extend` runs the next chunk as a continuation of the positions the row already holds). Decode
steps run only the rows in use, never the free ones. When a sequence ends, the last row's filled positions move into the hole, so the rows in use
stay a prefix (on the CPU the move is a memcpy of the filled positions only).

Prefix reuse: each row remembers the token ids whose keys and values fill its first positions, also
after it is freed (until something overwrites it). A prompt that starts like one of them (the same
system prompt and chat template, a conversation's next turn) takes those positions from that row, a
memcpy, or in place when it is the same row, and only the rest of the prompt runs, as a continuation
of the cached prefix. The logits equal a full prefill's (tested); `last_cached` says how many prompt
tokens the last prefill did not recompute.

With an int8 cache and the artifact's float-cache graph (runtime.float_prefill), a prompt runs there
and its keys and values are rounded into the row; a reused prefix is read back from its codes, so the
logits then equal a whole prefill's up to the cache's rounding, not to the bit.

Views are bound by address (IO binding with a buffer pointer), so every binding shares the one
allocation. Each (start, stop) range is bound once and reused.

On CUDA (`device="cuda"`) the cache lives in GPU memory, in the graph's dtype (float16 for a CUDA
export): the same views are bound at device addresses, and rows are copied on the device by a small
graph (runtime.serve.row_copy), whole rows rather than filled positions. Prompts and tokens go in
from the host and each step's logits come back to it; the sampling stays on the host.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeFailure
from runtime.float_prefill import FloatPrefill
from runtime.io_spec import Contract
from runtime.kv_cache import StaticKVCache
from runtime.serve.row_copy import RowCopy, row_address


class SlotCache:
    """A fused graph's session driving `slots` sequences of up to `max_length` positions each."""

    def __init__(
        self,
        session: ort.InferenceSession,
        contract: Contract,
        slots: int,
        max_length: int,
        reuse_prefixes: bool = True,
        float_prefill: FloatPrefill | None = None,
        device: str = "cpu",
        copy_on_device: bool | None = None,
    ):
        """`device`: where the cache lives, the session's device ("cpu" or "cuda"). `copy_on_device`: copy
        rows with the graph a device cache needs (default: off the CPU only; tests set it on the CPU)."""
        if contract.flavour != "fused":
            raise RuntimeFailure("serving needs the fused graph (export with `fused: true`)")
        if slots < 1 or max_length < 2:
            raise RuntimeFailure(f"need at least 1 slot and 2 positions, got {slots} slots of {max_length}")
        self.session, self.contract = session, contract
        self.slots, self.max_length = slots, max_length
        if float_prefill is not None and device != "cpu":
            raise RuntimeFailure("prompts through the float-cache graph run on the CPU only")
        cache = StaticKVCache(contract, slots, max_length, device)  # checks the model's positions (and host memory)
        self.nbytes, self.device = cache.nbytes, device
        self.values = [cache.values[name] for name in contract.past_names()]  # [slots, kv_heads, max_length, head_dim]
        self.buffers = cache.host  # the same memory as numpy arrays, on the CPU only
        self.kv_dtype = np.dtype(contract.kv_dtype)
        if copy_on_device is None:
            copy_on_device = device != "cpu"
        self._row_copy = RowCopy(self.values, self.kv_dtype, device) if copy_on_device else None
        self.lengths = cache.lengths  # positions filled in each row
        self.reuse_prefixes = reuse_prefixes
        self.float_prefill = float_prefill  # int8 cache: prompts run through the float-cache graph
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # ids whose KV fills each row's first positions
        self.last_cached = 0  # prompt tokens the last prefill took from the cache
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self._logits: dict[int, np.ndarray] = {}  # rows -> reused [rows, 1, V] host buffer
        self._total_length = np.array(max_length, dtype=np.int32)  # GQA's total_sequence_length when decoding

    def _binding(self, start: int, stop: int) -> ort.IOBinding:
        """IO binding whose past and present are the cache rows [start, stop)."""
        binding = self._bindings.get((start, stop))
        if binding is None:
            binding = self.session.io_binding()
            names = zip(self.contract.past_names(), self.contract.present_names(), self.values)
            for past, present, value in names:
                shape = [stop - start, *value.shape()[1:]]  # contiguous: a row range of a C-ordered buffer
                address = row_address(value, start, self.kv_dtype)
                binding.bind_input(past, self.device, 0, self.kv_dtype, shape, address)
                binding.bind_output(present, self.device, 0, self.kv_dtype, shape, address)
            self._bindings[(start, stop)] = binding
        return binding

    def _run(
        self,
        binding: ort.IOBinding,
        input_ids: np.ndarray,
        seqlens_k: np.ndarray,
        total_length: np.ndarray,
        positions: np.ndarray,
    ) -> np.ndarray:
        rows = input_ids.shape[0]
        logits = self._logits.get(rows)
        if logits is None:
            logits = self._logits[rows] = np.empty((rows, 1, self.contract.vocab_size), dtype=np.float32)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("seqlens_k", seqlens_k)
        binding.bind_cpu_input("total_sequence_length", total_length)
        binding.bind_cpu_input("logits_positions", positions)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits[:, 0]

    def prefill(self, row: int, prompt: list[int]) -> np.ndarray:
        """Run one prompt into the empty row `row`; returns its last logits [V] (valid until the next call)."""
        cached = self.start(row, prompt)
        return self.extend(row, prompt, len(prompt) - cached)

    def start(self, row: int, prompt: list[int]) -> int:
        """Claim the empty row `row` for `prompt` and fill it with the longest cached prefix (at most all
        but the last token); returns how many positions that gave. `extend` runs the rest."""
        n = len(prompt)
        if not 0 < n < self.max_length:
            raise RuntimeFailure(f"a prompt needs 1 to {self.max_length - 1} tokens, got {n}")
        if self.lengths[row]:
            raise RuntimeFailure(f"slot {row} is in use")
        source, cached = self._longest_prefix(row, prompt) if self.reuse_prefixes else (row, 0)
        self.tokens[row] = []  # overwritten from here on, whatever happens
        if cached and source != row:
            self._copy(source, row, cached)
        self.lengths[row], self.tokens[row], self.last_cached = cached, list(prompt[:cached]), cached
        return cached

    def extend(self, row: int, prompt: list[int], count: int) -> np.ndarray:
        """Run the next `count` tokens of `prompt` into row `row` after the positions it holds (a chunk of a
        long prompt, as a continuation); returns the logits [V] after the chunk's last token, the
        prompt's next-token logits once the chunk ends the prompt."""
        done = int(self.lengths[row])
        n = done + count
        if count < 1 or n > len(prompt) or self.tokens[row] != list(prompt[:done]):
            raise RuntimeFailure(f"slot {row} holds {done} positions of another prompt, or {count} tokens overrun it")
        ids, last = np.asarray([prompt[done:n]], dtype=np.int64), np.array([[count - 1]], dtype=np.int64)
        if self.float_prefill is not None:
            logits = self.float_prefill.run(ids, np.array([n]), last, [b[row : row + 1] for b in self.buffers], done)[
                :, 0
            ]
        else:
            logits = self._run(
                self._binding(row, row + 1), ids, np.array([n - 1], dtype=np.int32), np.array(n, dtype=np.int32), last
            )
        self.lengths[row], self.tokens[row] = n, list(prompt[:n])
        return logits[0]

    def _longest_prefix(self, row: int, prompt: list[int]) -> tuple[int, int]:
        """(row, length) of the longest cached prefix of `prompt`, leaving at least its last token to run
        (the logits come from it); `row` itself wins ties, since it needs no copy."""
        best, length = row, 0
        wanted = np.asarray(prompt[:-1], dtype=np.int64)
        for other in [row] + [r for r in range(self.slots) if r != row]:
            limit = min(len(self.tokens[other]), len(wanted))
            differ = np.flatnonzero(np.asarray(self.tokens[other][:limit], dtype=np.int64) != wanted[:limit])
            same = int(differ[0]) if len(differ) else limit
            if same > length:
                best, length = other, same
        return best, length

    def _copy(self, src: int, dst: int, n: int) -> None:
        if self._row_copy is not None:
            self._row_copy(src, dst)
            return
        for buffer in self.buffers:
            buffer[dst, :, :n] = buffer[src, :, :n]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One token for each of rows 0..k-1 (k = len(tokens)) -> their logits [k, V]."""
        k = len(tokens)
        if int(self.lengths[:k].max()) >= self.max_length:
            raise RuntimeFailure(f"a slot is full ({self.max_length} positions)")
        logits = self._run(
            self._binding(0, k),
            np.asarray(tokens, dtype=np.int64).reshape(k, 1),
            self.lengths[:k].copy(),  # GQA's seqlens_k: the new total minus one = the past
            self._total_length,
            np.zeros((k, 1), dtype=np.int64),
        )
        self.lengths[:k] += 1
        for row, token in enumerate(tokens):
            self.tokens[row].append(int(token))
        return logits

    def move(self, src: int, dst: int) -> None:
        """Move row `src`'s filled positions into the free row `dst`; `src` becomes free."""
        n = int(self.lengths[src])
        self._copy(src, dst, n)
        self.lengths[dst], self.lengths[src] = n, 0
        self.tokens[dst] = list(self.tokens[src])  # src keeps its copy too: its positions are untouched

    def free(self, row: int) -> None:
        """The row takes no more steps; its positions stay readable as a prefix for later prompts."""
        self.lengths[row] = 0

    def forget(self) -> None:
        """Drop every free row's remembered prefix (after a warm-up on made-up tokens)."""
        for row in range(self.slots):
            if not self.lengths[row]:
                self.tokens[row] = []
