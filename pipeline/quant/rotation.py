"""Block Hadamard rotation of a linear's input (QuaRot, Ashkboos et al., 2024), for W8A8.

A linear y = x Wᵀ is unchanged when both its input and its weight rows are rotated by one
orthogonal Q: (x Q)(W Q)ᵀ = x Wᵀ. A Hadamard Q mixes every channel of a block into every other,
so a token's few large channels are spread over the block: its largest |x| shrinks towards its
root mean square, and one int8 scale wastes far fewer levels on it. down_proj's input (the
SwiGLU product) cannot take the rotation offline (no linear op feeds it), so the exported graph
rotates it at run time: reshape to rows of `BLOCK`, one small matmul, reshape back.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 128  # Sylvester Hadamard width: 128 x 128 floats per graph, 128 multiply-adds per input channel


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two); symmetric, its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order {n} is not a power of two")
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def can_rotate(width: int, block: int = BLOCK) -> bool:
    return width % block == 0


def rotate(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """x Q for the block-diagonal Q = diag(H, …, H) along the last axis (also rotates weight rows [out, in])."""
    h = torch.from_numpy(hadamard(block)).to(x.dtype)
    return (x.reshape(*x.shape[:-1], x.shape[-1] // block, block) @ h).reshape(x.shape)
