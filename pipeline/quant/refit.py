"""Least-squares refit of a quantized weight's group scales on the layer's output error.

Rounding picks each block's scale from its range (clipped by AWQ's search, chosen by GPTQ's MSE
search) and then the codes. For the codes it ends with, the scales are no longer the best: the
output error of one row, |X (Ŵ - W)ᵀ|² with Ŵ = scale · (q - zero) per block, is a quadratic in
that row's k_blocks scales, minimized in closed form through the inputs' Gram matrix H = XᵀX.
All of a row's blocks are fitted together, since their inputs are correlated. Codes are then
re-rounded for the new scales, and the two steps alternate. Every step is kept per row only where
it lowers the error, so the result is never worse than the input.

Integer zero points stay as they are: the layout (MatMulNBits, GGUF, compressed-tensors) does not
change. Fitting them too (offset by least squares, then rounded) changed under 1 % of the zero points
in the five SmolLM2 layers tried, so it is not done. Float zero points are fitted with the scales
(Ŵ = s·q - t per block, both linear).

With `descent`, each round also runs a pass of cyclic coordinate descent on the codes (as QuantEase
does): each code in turn becomes the best integer for the same output error given the others. That is
the step re-rounding to nearest cannot take, since it ignores how blocks' inputs correlate.
"""

from __future__ import annotations

import torch

from pipeline.quant.primitives import QTensor, quantize_with, to_groups


def padded_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """XᵀX [Kp, Kp] of inputs x [T, K], zero-padded to whole blocks like the weight."""
    xp = to_groups(x.float(), group_size).reshape(x.shape[0], -1)
    return xp.T @ xp


MIN_BUDGET = 256 * 2**20  # below this, chunks of few rows run slower (4,864-wide layers: 7.6 s at 64 MiB, 5.4 s here)


def rows_per_chunk(n: int, kp: int, groups: int, budget_bytes: int | None = None) -> int:
    """How many rows are refitted together. Each row's largest temporary is H c by block, [Kp, G] float32, so a
    whole layer at once needs N·Kp·Kp/group_size floats (about 100 GB for an 8B model's down_proj). The rows
    are independent: a chunk keeps that temporary within `budget_bytes`, by default the layer's own float32
    weight (at least 256 MiB)."""
    budget = budget_bytes or max(MIN_BUDGET, 4 * n * kp)
    return max(1, min(n, budget // (4 * kp * (groups + 4))))


@torch.no_grad()
def refit_scales(
    qt: QTensor, w: torch.Tensor, gram: torch.Tensor, rounds: int = 4, chunk: int | None = None, descent: bool = False
) -> QTensor:
    """`qt` (the quantized `w` [N, K]) with each row's scales refitted on the output error under `gram`
    ([K, K] or padded [Kp, Kp]; any positive multiple of XᵀX gives the same answer). `chunk` rows at a
    time (default: `rows_per_chunk`, which bounds the temporaries by the layer's own size)."""
    scheme = qt.scheme
    wg = to_groups(w.float(), scheme.group_size)
    kp = wg.shape[1] * wg.shape[2]
    chunk = chunk or rows_per_chunk(wg.shape[0], kp, wg.shape[1])
    if gram.shape[0] != kp:
        gram = torch.nn.functional.pad(gram.float(), (0, kp - gram.shape[0], 0, kp - gram.shape[0]))
    scale, zero, q = qt.scale.clone().float(), qt.zero.clone().float(), qt.q.float()
    gram = gram.float()
    for lo in range(0, wg.shape[0], chunk):
        rows = slice(lo, lo + chunk)
        scale[rows], zero[rows], q[rows] = _refit_rows(
            wg[rows], scale[rows], zero[rows], q[rows], gram, scheme.maxq, scheme.float_zero, rounds, descent
        )
    return QTensor(q.to(torch.uint8), scale.to(qt.scale.dtype), zero.to(qt.zero.dtype), scheme, qt.in_features)


def _refit_rows(wg, scale, zero, q, gram, maxq: int, float_zero: bool, rounds: int, descent: bool):
    n, groups, gs = wg.shape
    w_flat = wg.reshape(n, -1)
    hw = (w_flat @ gram).view(n, groups, gs)  # H w per row, by block
    h_blocks = gram.view(-1, groups, gs)
    h_ones = h_blocks.sum(-1).view(groups, gs, groups)  # H 1_h at block g, position l: for the offsets' columns

    def error(codes, s, z):
        d = ((codes - z[..., None]) * s[..., None]).reshape(n, -1) - w_flat
        return ((d @ gram) * d).sum(-1)

    def solve(a, b, ridge):
        return torch.linalg.solve(a + torch.diag_embed(ridge), b[..., None])[..., 0]

    def scales_for(codes, z):
        c = codes - z[..., None]  # [n, G, gs]
        hc = torch.einsum("kgl,ngl->nkg", h_blocks, c).view(n, groups, gs, groups)
        a = torch.einsum("ngl,nglh->ngh", c, hc)  # [n, G, G]: c_gᵀ H_gh c_h
        ridge = 1e-6 * a.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp(min=1e-30).expand(n, groups)
        return solve(a, (c * hw).sum(-1), ridge)  # right side c_gᵀ (H w)_g

    def scales_and_offsets_for(codes):
        """Ŵ_g = s_g q_g - t_g: both fitted at once; the zero point is t/s."""
        hq = torch.einsum("kgl,ngl->nkg", h_blocks, codes).view(n, groups, gs, groups)
        a_ss = torch.einsum("ngl,nglh->ngh", codes, hq)
        a_st = -torch.einsum("ngl,glh->ngh", codes, h_ones)
        a_tt = h_ones.sum(1).expand(n, groups, groups)
        a = torch.cat([torch.cat([a_ss, a_st], 2), torch.cat([a_st.transpose(1, 2), a_tt], 2)], 1)
        ridge = 1e-6 * a.diagonal(dim1=1, dim2=2).clamp(min=1e-30)  # per unknown: scales and offsets differ in size
        x = solve(a, torch.cat([(codes * hw).sum(-1), -hw.sum(-1)], 1), ridge)
        return x[:, :groups], x[:, groups:]

    def valid(s):
        return torch.isfinite(s).all(-1) & (s > 1e-10).all(-1)

    best = error(q, scale, zero)
    for _ in range(rounds):
        if float_zero:
            s, t = scales_and_offsets_for(q)
            z = t / s
            ok = valid(s) & torch.isfinite(z).all(-1)
            s, z = torch.where(ok[:, None], s, scale), torch.where(ok[:, None], z, zero)
            err = error(q, s, z)
            keep = err < best
            scale, zero, best = (
                torch.where(keep[:, None], s, scale),
                torch.where(keep[:, None], z, zero),
                torch.where(keep, err, best),
            )
        s = scales_for(q, zero)
        s = torch.where(torch.isfinite(s) & (s > 1e-10), s, scale)
        err = error(q, s, zero)
        keep = err < best
        scale, best = torch.where(keep[:, None], s, scale), torch.where(keep, err, best)
        requant = quantize_with(wg, scale[..., None], zero[..., None], maxq, float_zero)
        err = error(requant, scale, zero)
        keep = err < best
        q, best = torch.where(keep[:, None, None], requant, q), torch.where(keep, err, best)
        if descent:
            q = descend_codes(w_flat, scale, zero, q, gram, maxq)
            best = error(q, scale, zero)
    return scale, zero, q


def descend_codes(w_flat, scale, zero, q, gram, maxq: int, block: int = 128):
    """One pass of cyclic coordinate descent on the integer codes of each row, scales and zero points fixed:
    each code in turn moves to the integer that minimizes the row's output error given all the others (a
    1-D convex quadratic, so the rounded minimizer, clamped to the grid). No step can raise the error. The
    gradient H (Ŵ - W) is kept current inside a block of columns and brought up to date outside it once
    per block, as GPTQ does its lazy updates. Columns are visited in order; rows move together."""
    n, groups, gs = q.shape
    kp = groups * gs
    s_cols = scale.repeat_interleave(gs, 1).T.contiguous()  # [kp, n]: one column's values contiguous
    codes = q.reshape(n, kp).T.clone(memory_format=torch.contiguous_format)  # never the caller's memory
    grad = gram @ ((codes - zero.repeat_interleave(gs, 1).T) * s_cols - w_flat.T)
    diag = gram.diagonal()
    inv = torch.where(diag[:, None] > 0, 1 / (s_cols * diag[:, None]), torch.zeros(()))  # 0 for padded columns
    for b0 in range(0, kp, block):
        b1 = min(b0 + block, kp)
        steps = torch.zeros(b1 - b0, n)
        for j in range(b0, b1):
            new = (codes[j] - torch.round(grad[j] * inv[j])).clamp_(0, maxq)
            step = steps[j - b0]
            torch.mul(new - codes[j], s_cols[j], out=step)
            codes[j] = new
            grad[b0:b1].addr_(gram[b0:b1, j], step)
        grad[:b0] += gram[:b0, b0:b1] @ steps
        grad[b1:] += gram[b1:, b0:b1] @ steps
    return codes.T.contiguous().view(n, groups, gs)
