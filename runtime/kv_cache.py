"""The KV cache between steps: past tensors in, present tensors out, swapped after each run."""
from __future__ import annotations

import numpy as np

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
