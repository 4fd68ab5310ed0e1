"""KV caches between steps.

KVCache (portable graph): past tensors in, present tensors (one position longer) out, swapped
after each run. StaticKVCache (fused graph): one buffer per layer and kind, allocated once at
`max_length` positions and bound as both past and present, so the graph writes new keys and
values in place: no concatenation, no allocation, no copy between steps.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeFailure
from runtime.io_spec import Contract


class KVCache:
    def __init__(self, contract: Contract, batch: int):
        self.names = contract.past_names()
        self.present_names = contract.present_names()
        shape = (batch, contract.num_kv_heads, 0, contract.head_dim)  # prefill starts from an empty past
        self.past = {n: np.zeros(shape, dtype=contract.dtype) for n in self.names}

    @property
    def length(self) -> int:
        return self.past[self.names[0]].shape[2]

    def feeds(self) -> dict[str, np.ndarray]:
        return self.past

    def update(self, presents: list[np.ndarray]) -> None:
        """Take the graph's present.* outputs (past + new tokens) as the next step's past."""
        self.past = dict(zip(self.names, presents))

    def select(self, rows: np.ndarray) -> None:
        """Keep only the given batch rows (sequences that are still generating)."""
        self.past = {n: t[rows] for n, t in self.past.items()}


class StaticKVCache:
    """Preallocated [batch, kv_heads, max_length, head_dim] buffers on the session's device."""

    def __init__(self, contract: Contract, batch: int, max_length: int, device: str = "cpu"):
        if contract.max_positions and max_length > contract.max_positions:
            raise RuntimeFailure(f"max_length {max_length} exceeds the model's {contract.max_positions} positions")
        self.batch, self.max_length, self.device = batch, max_length, device
        self.nbytes = contract.kv_bytes_per_token(batch) * max_length
        check_fits(self.nbytes, device)
        shape = (batch, contract.num_kv_heads, max_length, contract.head_dim)
        self.host: list[np.ndarray] = []  # CPU: one array per past name; the OrtValues borrow their memory
        self.values: dict[str, ort.OrtValue] = {}
        for past, present in zip(contract.past_names(), contract.present_names()):
            if device == "cpu":
                array = np.zeros(shape, dtype=contract.kv_dtype)
                self.host.append(array)
                value = ort.OrtValue.ortvalue_from_numpy(array)
            else:
                value = _device_buffer(shape, np.dtype(contract.kv_dtype), device, self.nbytes)
            self.values[past] = value
            self.values[present] = value
        self.lengths = np.zeros(batch, dtype=np.int32)  # tokens held by each row

    def fits(self, batch: int, length: int) -> bool:
        return batch == self.batch and length <= self.max_length


def _device_buffer(shape: tuple, dtype: np.dtype, device: str, total: int) -> ort.OrtValue:
    try:
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
    except Exception as e:  # onnxruntime raises a bare RuntimeError with the allocator's message
        raise RuntimeFailure(
            f"the KV cache ({total / 2**20:.0f} MiB) could not be allocated on {device}: {e}; "
            f"lower max_length or the batch size (serve: --slots, --max-length, --kv-budget-mb)"
        ) from None


def check_fits(nbytes: int, device: str) -> None:
    """A readable error before allocating a cache the machine cannot hold (host memory only)."""
    if device != "cpu":
        return
    available = _available_memory()
    if available is not None and nbytes > available:
        raise RuntimeFailure(
            f"the KV cache needs {nbytes / 2**20:.0f} MiB but only {available / 2**20:.0f} MiB of memory "
            f"is available; lower max_length or the batch size"
        )


def _available_memory() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
