"""Least-squares refit of a quantized weight's group scales on the layer's output error.

Rounding picks each block's scale from its range (clipped by AWQ's search, chosen by GPTQ's MSE
search) and then the codes. For the codes it ends with, the scales are no longer the best: the
output error of one row, |X (Ŵ - W)ᵀ|² with Ŵ = scale · (q - zero) per block, is a quadratic in
that row's k_blocks scales, minimized in closed form through the inputs' Gram matrix H = XᵀX.
All of a row's blocks are fitted together, since their inputs are correlated. Codes are then
re-rounded for the new scales, and the two steps alternate. Every step is kept per row only where
it lowers the error, so the result is never worse than the input. Zero points stay as they are, so
the layout (MatMulNBits, GGUF, compressed-tensors) does not change.
"""
from __future__ import annotations

import torch

from pipeline.quant.primitives import QTensor, quantize_with, to_groups


def padded_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """XᵀX [Kp, Kp] of inputs x [T, K], zero-padded to whole blocks like the weight."""
    xp = to_groups(x.float(), group_size).reshape(x.shape[0], -1)
    return xp.T @ xp


@torch.no_grad()
def refit_scales(qt: QTensor, w: torch.Tensor, gram: torch.Tensor, rounds: int = 4, chunk: int = 4096) -> QTensor:
    """`qt` (the quantized `w` [N, K]) with each row's scales refitted on the output error under `gram`
    ([K, K] or padded [Kp, Kp]; any positive multiple of XᵀX gives the same answer)."""
    scheme = qt.scheme
    wg = to_groups(w.float(), scheme.group_size)
    kp = wg.shape[1] * wg.shape[2]
    if gram.shape[0] != kp:
        gram = torch.nn.functional.pad(gram.float(), (0, kp - gram.shape[0], 0, kp - gram.shape[0]))
    scale, q = qt.scale.clone().float(), qt.q.float()
    for lo in range(0, wg.shape[0], chunk):
        rows = slice(lo, lo + chunk)
        scale[rows], q[rows] = _refit_rows(wg[rows], scale[rows], qt.zero[rows].float(), q[rows], gram.float(),
                                           scheme.maxq, scheme.float_zero, rounds)
    return QTensor(q.to(torch.uint8), scale.to(qt.scale.dtype), qt.zero, scheme, qt.in_features)


def _refit_rows(wg, scale, zero, q, gram, maxq: int, float_zero: bool, rounds: int):
    n, groups, gs = wg.shape
    w_flat = wg.reshape(n, -1)
    hw = (w_flat @ gram).view(n, groups, gs)  # H w per row, by block

    def error(codes, s):
        d = ((codes - zero[..., None]) * s[..., None]).reshape(n, -1) - w_flat
        return ((d @ gram) * d).sum(-1)

    best = error(q, scale)
    for _ in range(rounds):
        c = q - zero[..., None]  # [n, G, gs]
        hc = torch.einsum("kgl,ngl->nkg", gram.view(-1, groups, gs), c).view(n, groups, gs, groups)
        a = torch.einsum("ngl,nglh->ngh", c, hc)  # [n, G, G]: c_gᵀ H_gh c_h
        b = (c * hw).sum(-1)  # [n, G]: c_gᵀ (H w)_g
        ridge = 1e-6 * a.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)
        fitted = torch.linalg.solve(a + ridge[:, None, None] * torch.eye(groups), b[..., None])[..., 0]
        fitted = torch.where(torch.isfinite(fitted) & (fitted > 1e-10), fitted, scale)
        err = error(q, fitted)
        keep = err < best
        scale, best = torch.where(keep[:, None], fitted, scale), torch.where(keep, err, best)
        requant = quantize_with(wg, scale[..., None], zero[..., None], maxq, float_zero)
        err = error(requant, scale)
        keep = err < best
        q, best = torch.where(keep[:, None, None], requant, q), torch.where(keep, err, best)
    return scale, q
