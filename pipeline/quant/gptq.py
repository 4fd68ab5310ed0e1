"""GPTQ: quantize a weight column by column, spreading each column's rounding error over the
columns not yet quantized through the inverse Hessian of the layer's calibration inputs
(Frantar et al., 2022). H = 2/n * sum x x^T over calibration tokens.

With `act_order`, columns are visited by decreasing Hessian diagonal (the most salient first).
Group scales and zero points are then fixed up front from the original weight ("static groups")
so every group stays a contiguous block of K, as MatMulNBits requires.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.quant.primitives import (
    QTensor,
    QuantScheme,
    choose_qparams,
    choose_qparams_mse,
    from_codes,
    quantize_with,
    to_groups,
)
from pipeline.quant.refit import refit_scales

if TYPE_CHECKING:
    from pipeline.configs import QuantizeConfig


class HessianAccumulator:
    """Running H = 2/n * X^T X of a linear layer's inputs, fed by a forward hook."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, K]
        total = self.n + x.shape[0]
        self.H *= self.n / total
        add_gram(self.H, x, 2.0 / total)
        self.n = total
        if not torch.isfinite(self.H.diagonal()).all():  # every input lands on the diagonal: NaN/Inf show there
            raise FloatingPointError("NaN or Inf in the calibration activations")


def add_gram(H: torch.Tensor, x: torch.Tensor, alpha: float, width: int = 256) -> None:
    """H += alpha * xᵀx, multiplying only the column blocks on and above the diagonal and mirroring the rest:
    with 6 blocks 7/12 of a full product (a decoder layer's Hessians: benchmarks/experiments/quantize_speed.py)."""
    k = x.shape[1]
    blocks = max(1, k // width)
    edges = [k * i // blocks for i in range(blocks + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        upper = x[:, a:b].T @ x[:, a:]  # [b - a, k - a]: this block row from the diagonal on
        H[a:b, a:].add_(upper, alpha=alpha)
        H[b:, a:b].add_(upper[:, b - a :].T, alpha=alpha)


def gptq(
    w: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    damp: float = 0.01,
    act_order: bool = True,
    mse_clip: bool = True,
    block: int = 128,
) -> QTensor:
    """Quantize W [N, K] given the Hessian H [K, K] of its inputs.

    `mse_clip` picks each group's range by a small search that minimizes its rounding error
    (the reference implementation's `mse` option) instead of the plain min/max.
    """
    qparams = choose_qparams_mse if mse_clip else choose_qparams
    W = w.detach().clone().float()
    H = H.clone()
    n, k = W.shape
    gs = scheme.group_size
    block = max(block, gs) // gs * gs  # whole groups per block, so a group's columns are updated before its params
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order
    if static:
        scale, zero = qparams(to_groups(W, gs), scheme)  # [N, k_blocks]
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scale = torch.zeros(n, -(-k // gs))
        zero = torch.zeros_like(scale)
        perm = torch.arange(k)
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if not static and col % gs == 0:
                scale[:, g], zero[:, g] = qparams(W1[:, i : i + gs], scheme)
            w_col = W1[:, i]
            q = quantize_with(w_col, scale[:, g], zero[:, g], scheme.maxq, scheme.float_zero)
            codes[:, i1 + i] = q
            err = (w_col - (q - zero[:, g]) * scale[:, g]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if static:
        codes = codes[:, torch.argsort(perm)]
    return from_codes(codes, scale, zero, scheme)


def gptq_refit(w: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, cfg: QuantizeConfig) -> QTensor:
    """GPTQ's codes with the recipe's settings, then (`refit_scales`) each row's group scales refitted on the
    output error under H (pipeline.quant.refit). Used by method gptq and by AWQ's `awq.codes: gptq`."""
    qt = gptq(w, H, scheme, cfg.gptq.damp, cfg.gptq.act_order, cfg.gptq.mse_clip)
    return refit_scales(qt, w, H, descent=cfg.code_descent) if cfg.refit_scales else qt
