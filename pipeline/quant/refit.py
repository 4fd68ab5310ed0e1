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


MIN_BUDGET = 256 * 2**20  # fewer rows a chunk run slower (an 8,192-wide layer: 1.6x at 31 rows against 256)


def rows_per_chunk(n: int, kp: int, groups: int, budget_bytes: int | None = None) -> int:
    """How many rows are refitted together. A row's temporaries are about three [G, G] systems and eight [Kp]
    vectors (float32); a chunk keeps them within `budget_bytes`, by default the layer's own float32 weight (at
    least 256 MiB). Rows are independent, so the chunking changes nothing but speed and memory."""
    budget = budget_bytes or max(MIN_BUDGET, 4 * n * kp)
    return max(1, min(n, budget // (4 * (3 * groups * groups + 8 * kp))))


@torch.no_grad()
def refit_scales(
    qt: QTensor, w: torch.Tensor, gram: torch.Tensor, rounds: int = 4, chunk: int | None = None, descent: bool = False
) -> QTensor:
    """`qt` (the quantized `w` [N, K]) with each row's scales refitted on the output error under `gram`
    ([K, K] or padded [Kp, Kp]; any positive multiple of XᵀX gives the same answer). `chunk` rows at a
    time (default: `rows_per_chunk`, which bounds the temporaries by the layer's own size). A row that a round
    leaves as it was is done: the next rounds would compute the same again."""
    scheme = qt.scheme
    wg = to_groups(w.float(), scheme.group_size)
    n, groups, gs = wg.shape
    kp = groups * gs
    chunk = chunk or rows_per_chunk(n, kp, groups)
    if gram.shape[0] != kp:
        gram = torch.nn.functional.pad(gram.float(), (0, kp - gram.shape[0], 0, kp - gram.shape[0]))
    gram = gram.float()
    h_ones = gram.view(-1, groups, gs).sum(-1).view(groups, gs, groups)  # H 1_h at block g, position l: the offsets
    scale, zero, q = qt.scale.clone().float(), qt.zero.clone().float(), qt.q.float()
    hw = torch.empty(n, groups, gs)  # H w per row, by block
    best = torch.empty(n)  # each row's output error as it stands
    for lo in range(0, n, chunk):
        rows = slice(lo, lo + chunk)
        hw[rows] = (wg[rows].reshape(-1, kp) @ gram).view(-1, groups, gs)
        best[rows] = _error(wg[rows], q[rows], scale[rows], zero[rows], gram)
    active = torch.arange(n)
    for _ in range(rounds):
        moved = torch.zeros(n, dtype=torch.bool)
        for lo in range(0, len(active), chunk):
            rows = active[lo : lo + chunk]
            state = (scale[rows], zero[rows], q[rows], best[rows])
            fitted = _refit_round(wg[rows], hw[rows], *state, gram, h_ones, scheme.maxq, scheme.float_zero, descent)
            moved[rows] = ~_same(fitted[:3], state[:3])
            scale[rows], zero[rows], q[rows], best[rows] = fitted
        active = active[moved[active]]
        if not len(active):
            break
    return QTensor(q.to(torch.uint8), scale.to(qt.scale.dtype), zero.to(qt.zero.dtype), scheme, qt.in_features)


def _same(new: tuple[torch.Tensor, ...], old: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per row: every tensor of `new` equals its `old` (scale, zero point, codes)."""
    same = torch.ones(new[0].shape[0], dtype=torch.bool)
    for a, b in zip(new, old):
        same &= (a == b).reshape(a.shape[0], -1).all(-1)
    return same


def _error(wg, q, scale, zero, gram) -> torch.Tensor:
    """Each row's output error (Ŵ - W) H (Ŵ - W)ᵀ."""
    d = ((q - zero[..., None]) * scale[..., None] - wg).reshape(wg.shape[0], -1)
    return ((d @ gram) * d).sum(-1)


def codes_gram(c: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per row, CᵀHC [n, G, G] for the block-diagonal C [Kp, G] that holds the row's block g codes c[n, g] in
    block g: entry (g, h) is c_gᵀ H_gh c_h. One block row at a time from the diagonal on, mirrored as it goes: the
    [n, Kp, G] product H C is never formed (4x faster on an 8,192-wide layer, and a fraction of the memory)."""
    n, groups, gs = c.shape
    out = torch.zeros(n, groups, groups)
    for g in range(groups):
        hc = (c[:, g] @ gram[g * gs : (g + 1) * gs, g * gs :]).view(n, groups - g, gs)  # c_gᵀ H_gh for h >= g
        out[:, g, g:] = torch.einsum("nhl,nhl->nh", hc, c[:, g:])
        out[:, g + 1 :, g] = out[:, g, g + 1 :]
    return out


def _refit_round(wg, hw, scale, zero, q, best, gram, h_ones, maxq: int, float_zero: bool, descent: bool):
    """One round for a chunk of rows: (float zero points: scales and offsets fitted together, then) the scales
    for the codes, then the codes re-rounded for them, each kept per row only where it lowers `best`."""
    n, groups, gs = wg.shape

    def error(codes, s, z):
        return _error(wg, codes, s, z, gram)

    def solve(a, b, ridge):
        a.diagonal(dim1=1, dim2=2).add_(ridge)  # in place: `a` is a fresh [n, G, G] and the largest temporary
        return torch.linalg.solve(a, b[..., None])[..., 0]

    def scales_for(codes, z):
        c = codes - z[..., None]  # [n, G, gs]
        a = codes_gram(c, gram)  # [n, G, G]: c_gᵀ H_gh c_h
        ridge = 1e-6 * a.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp(min=1e-30).expand(n, groups)
        return solve(a, (c * hw).sum(-1), ridge)  # right side c_gᵀ (H w)_g

    def scales_and_offsets_for(codes):
        """Ŵ_g = s_g q_g - t_g: both fitted at once; the zero point is t/s."""
        a_ss = codes_gram(codes, gram)
        a_st = -torch.einsum("ngl,glh->ngh", codes, h_ones)
        a_tt = h_ones.sum(1).expand(n, groups, groups)
        a = torch.cat([torch.cat([a_ss, a_st], 2), torch.cat([a_st.transpose(1, 2), a_tt], 2)], 1)
        ridge = 1e-6 * a.diagonal(dim1=1, dim2=2).clamp(min=1e-30)  # per unknown: scales and offsets differ in size
        x = solve(a, torch.cat([(codes * hw).sum(-1), -hw.sum(-1)], 1), ridge)
        return x[:, :groups], x[:, groups:]

    def valid(s):
        return torch.isfinite(s).all(-1) & (s > 1e-10).all(-1)

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
        q = descend_codes(wg.reshape(n, -1), scale, zero, q, gram, maxq)
        best = error(q, scale, zero)
    return scale, zero, q, best


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
