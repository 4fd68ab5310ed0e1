"""Group-wise integer weight quantization in the layout of ONNX Runtime's `MatMulNBits`.

A linear weight W [N, K] (out, in) is cut along K into blocks of `group_size`; the last block is
zero-padded when group_size does not divide K. Each block has a float scale and an integer zero
point, and dequantizes as (q - zero_point) * scale with q in [0, 2**bits - 1]. Symmetric blocks use
the fixed zero point 2**(bits-1), which is also MatMulNBits' default when no zero points are given.

With `float_zero` (asymmetric only) a block's zero point is any float, so its grid runs from the
block's exact minimum to its exact maximum, as llama.cpp's Q4_1 stores it (d * q + m with a float m):
an integer zero point can only start the grid at a multiple of the scale. MatMulNBits takes float
zero points as they are; `pipeline.graph.float_zero` rewrites them for ONNX Runtime's CPU kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class QuantScheme:
    bits: int  # 4 or 8
    group_size: int  # power of two >= 16 (what MatMulNBits takes)
    symmetric: bool
    float_zero: bool = False  # asymmetric blocks with float zero points (the grid spans the block's exact range)

    def __post_init__(self):
        if self.float_zero and self.symmetric:
            raise ValueError("float zero points are for asymmetric blocks only")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def label(self) -> str:
        return f"int{self.bits} g{self.group_size} {'sym' if self.symmetric else 'asym'}{' float-zp' if self.float_zero else ''}"


def count_schemes(schemes) -> dict[str, int]:
    """{'int4 g32 asym': 181, ...} for a plan's schemes."""
    counts: dict[str, int] = {}
    for s in schemes:
        counts[s.label] = counts.get(s.label, 0) + 1
    return counts


@dataclass
class QTensor:
    """A quantized weight: codes [N, k_blocks, group_size] uint8, scale and zero point [N, k_blocks]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme
    in_features: int  # K before padding

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.in_features


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [N, K] -> [N, k_blocks, group_size], zero-padding the last block."""
    n, k = w.shape
    blocks = -(-k // group_size)
    if blocks * group_size != k:
        w = torch.nn.functional.pad(w, (0, blocks * group_size - k))
    return w.reshape(n, blocks, group_size)


Clip = torch.Tensor | float | tuple[torch.Tensor, torch.Tensor]


def choose_qparams(groups: torch.Tensor, scheme: QuantScheme, clip: Clip = 1.0):
    """Scale and integer zero point per group of `groups` [..., G]; `clip` shrinks the range (AWQ clip search):
    one factor for both ends, or (factor for the max, factor for the min) for asymmetric groups."""
    top, bottom = clip if isinstance(clip, tuple) else (clip, clip)
    if scheme.float_zero:  # the grid need not hold 0: it spans the block's own range
        gmax, gmin = groups.amax(dim=-1), groups.amin(dim=-1)
        mid = (gmax + gmin) / 2
        gmax, gmin = mid + (gmax - mid) * top, mid + (gmin - mid) * bottom
        scale = ((gmax - gmin) / scheme.maxq).clamp(min=1e-10)
        return scale, -gmin / scale
    gmax = groups.amax(dim=-1).clamp(min=0) * top
    gmin = groups.amin(dim=-1).clamp(max=0) * bottom
    if scheme.symmetric:
        absmax = torch.maximum(gmax, -gmin)
        scale = (2 * absmax / scheme.maxq).clamp(min=1e-10)
        zero = torch.full_like(scale, 2 ** (scheme.bits - 1))
    else:
        scale = ((gmax - gmin) / scheme.maxq).clamp(min=1e-10)
        zero = torch.round(-gmin / scale).clamp(0, scheme.maxq)
    return scale, zero


def choose_qparams_mse(
    groups: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.25, norm: float = 2.4
):
    """Per group, the range shrink in [1 - max_shrink, 1] whose fake-quantized error |w - q(w)|^norm is least."""
    best_scale, best_zero = choose_qparams(groups, scheme)
    best_err = torch.full(best_scale.shape, float("inf"))
    work = torch.empty_like(groups)  # fake quantization in place: the same result, a third of the time
    for i in range(grid + 1):
        clip = 1.0 - max_shrink * i / grid
        scale, zero = choose_qparams(groups, scheme, clip)
        fake = fake_quantize(groups, scale[..., None], zero[..., None], scheme.maxq, scheme.float_zero, work)
        err = fake.sub_(groups).abs_().pow_(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_with(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    float_zero: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer codes of w for given (broadcastable) scale and zero point; `out`, a buffer of the result's shape,
    takes the same steps in place (no temporaries)."""
    if out is not None:
        torch.div(w, scale, out=out)
        return (out.add_(zero).round_() if float_zero else out.round_().add_(zero)).clamp_(0, maxq)
    if float_zero:
        return torch.clamp(torch.round(w / scale + zero), 0, maxq)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    float_zero: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if out is not None:
        return quantize_with(w, scale, zero, maxq, float_zero, out).sub_(zero).mul_(scale)
    return (quantize_with(w, scale, zero, maxq, float_zero) - zero) * scale


def quantize(w: torch.Tensor, scheme: QuantScheme, clip: Clip = 1.0) -> QTensor:
    """Round-to-nearest quantization of W [N, K]."""
    groups = to_groups(w.float(), scheme.group_size)
    scale, zero = choose_qparams(groups, scheme, clip)
    q = quantize_with(groups, scale[..., None], zero[..., None], scheme.maxq, scheme.float_zero)
    return QTensor(q.to(torch.uint8), scale, zero, scheme, w.shape[1])


def dequantize(qt: QTensor) -> torch.Tensor:
    """QTensor -> float W [N, K] (padding dropped)."""
    w = (qt.q.float() - qt.zero[..., None]) * qt.scale[..., None]
    return w.reshape(w.shape[0], -1)[:, : qt.in_features]


def from_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> QTensor:
    """Build a QTensor from per-column codes q [N, K] and per-group scale/zero [N, k_blocks] (GPTQ's output)."""
    k = q.shape[1]
    return QTensor(to_groups(q.float(), scheme.group_size).to(torch.uint8), scale, zero, scheme, k)


def pack_matmul_nbits(qt: QTensor) -> dict[str, np.ndarray]:
    """MatMulNBits inputs: B uint8 [N, k_blocks, blob], scales f32 [N * k_blocks], zero_points uint8
    (packed two a byte for 4 bits) or, with float zero points, f32 [N * k_blocks] like the scales."""
    q = qt.q.numpy().astype(np.uint8)
    n, blocks, group = q.shape
    if qt.scheme.bits == 4:
        b = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # two codes a byte, low nibble first
    else:
        b = q
    out = {"B": np.ascontiguousarray(b), "scales": qt.scale.numpy().astype(np.float32).reshape(-1)}
    if qt.scheme.float_zero:
        out["zero_points"] = qt.zero.numpy().astype(np.float32).reshape(-1)
    elif not qt.scheme.symmetric:
        out["zero_points"] = pack_zero_points(qt.zero.numpy().astype(np.uint8), qt.scheme.bits)
    return out


def pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """Integer zero points [N, blocks] uint8 in MatMulNBits' layout: for 4 bits two a byte (low nibble
    first), each row padded to an even count; 8-bit ones as they are. Flattened."""
    if bits == 4:
        if zero.shape[1] % 2:
            zero = np.pad(zero, ((0, 0), (0, 1)))
        zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return np.ascontiguousarray(zero).reshape(-1)


def packed_bytes(qt: QTensor) -> int:
    return sum(a.nbytes for a in pack_matmul_nbits(qt).values())


def unpack_matmul_nbits(
    packed: dict[str, np.ndarray], layer: str, spec: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of `pack_matmul_nbits` for `layer`'s tensors in `packed` (keys `<layer>.B|scales|zero_points`)
    and its plan entry `spec`: codes [N, blocks, G] uint8, scale [N, blocks] float32, zero point [N, blocks]
    (uint8, or float32 for float zero points)."""
    n, k, bits, g = spec["N"], spec["K"], spec["bits"], spec["group_size"]
    blocks = -(-k // g)
    b = packed[f"{layer}.B"].reshape(n, blocks, -1)
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks, g) if bits == 4 else b.reshape(n, blocks, g)
    scale = packed[f"{layer}.scales"].reshape(n, blocks)
    if spec.get("float_zero"):
        return (
            q.astype(np.uint8),
            scale.astype(np.float32),
            packed[f"{layer}.zero_points"].reshape(n, blocks).astype(np.float32),
        )
    if spec["symmetric"]:
        zero = np.full((n, blocks), 2 ** (bits - 1), dtype=np.uint8)
    elif bits == 4:
        z = packed[f"{layer}.zero_points"].reshape(n, -1)
        zero = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        zero = packed[f"{layer}.zero_points"].reshape(n, blocks)
    return q.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)
