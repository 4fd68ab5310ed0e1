"""Prompts for an int8 KV cache, run through the float-cache twin of the graph.

ONNX Runtime's CPU GroupQueryAttention with an int8 cache rounds each new key and value into the
cache and then attends over the codes it has just written, also for a prompt: the whole prompt takes
1.15x (128 tokens) to 1.8x (1024 tokens) as long as with a float cache (SmolLM2 INT4 on an AVX2 CPU,
benchmarks/experiments/kv_int8_prefill.py). The export stage writes the same graph with a float cache beside the
int8 one (`prefill_model_file`, same weights file). A prompt runs there into a float scratch cache;
this module rounds the new positions into the int8 rows with the graph's own per-channel scales
(round half to even, saturated to int8's -128..127, as the kernel does) and decode steps go on in the
int8 graph.

A prompt's own attention therefore reads float keys and values, as it would without an int8 cache; a
prefix reused from the cache (serving), or an earlier chunk of the same prompt, is read back from its
codes. Decode steps read codes either way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeFailure
from runtime.io_spec import Contract


class FloatPrefill:
    """The float-cache session of an int8-cache artifact and the scales that turn its cache into codes."""

    def __init__(self, session: ort.InferenceSession, contract: Contract, scales: np.ndarray):
        want = (contract.num_layers, 2, contract.num_kv_heads, contract.head_dim)
        if scales.shape != want:
            raise RuntimeFailure(f"{contract.kv_scales_file}: scales of shape {scales.shape}, expected {want}")
        self.session, self.contract = session, contract
        self.dtype = np.dtype(contract.dtype)
        # one [1, kv_heads, 1, head_dim] scale per past name, in the contract's order (layer 0 key, value, …)
        self.scales = [
            scales[i, kind][None, :, None, :].astype(np.float32) for i in range(contract.num_layers) for kind in (0, 1)
        ]

    @classmethod
    def load(cls, folder: Path, contract: Contract, session: ort.InferenceSession) -> FloatPrefill:
        path = Path(folder) / contract.kv_scales_file
        if not path.is_file():
            raise RuntimeFailure(f"{folder}: {contract.kv_scales_file} not found (named by io_contract.json)")
        return cls(session, contract, np.load(path))

    def run(
        self, input_ids: np.ndarray, lengths: np.ndarray, positions: np.ndarray, codes: list[np.ndarray], start: int = 0
    ) -> np.ndarray:
        """Run right-padded prompts [B, S] (`lengths` [B]: each row's tokens after the step, cached ones
        included) whose first `start` positions are already in `codes` (one int8 [B, kv_heads, max_length,
        head_dim] array per past name; `start` > 0 for one row only). Writes each row's new positions into
        `codes` and returns the logits at `positions` [B, P] of the chunk: [B, P, V]."""
        batch, width = input_ids.shape
        if start and batch != 1:
            raise RuntimeFailure("a prompt continuing cached positions runs alone")
        total = start + width
        if total > codes[0].shape[2]:
            raise RuntimeFailure(f"{total} positions do not fit a cache of {codes[0].shape[2]}")
        scratch = [
            np.zeros((batch, self.contract.num_kv_heads, total, self.contract.head_dim), self.dtype) for _ in codes
        ]
        if start:
            for buffer, code, scale in zip(scratch, codes, self.scales):
                np.multiply(code[:, :, :start], scale, out=buffer[:, :, :start])
        binding = self.session.io_binding()
        for past, present, buffer in zip(self.contract.past_names(), self.contract.present_names(), scratch):
            binding.bind_input(past, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        logits = np.empty((batch, positions.shape[1], self.contract.vocab_size), dtype=np.float32)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", (np.asarray(lengths) - 1).astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        binding.bind_cpu_input("logits_positions", np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        stop = int(np.max(lengths))
        for buffer, code, scale in zip(scratch, codes, self.scales):
            code[:, :, start:stop] = quantize(buffer[:, :, start:stop], scale)
        return logits


def quantize(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x / scale rounded half to even and saturated to the int8 codes GroupQueryAttention stores."""
    return np.clip(np.rint(x / scale), -128, 127).astype(np.int8)
