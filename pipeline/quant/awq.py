"""AWQ: activation-aware weight quantization (Lin et al., 2023).

Channels that see large activations matter most. For linears fed the same input X, a per-input-
channel scale s moves weight magnitude onto those channels before rounding:

    y = X Wᵀ = (X / s)(W s)ᵀ        W s is quantized; X / s is folded into the op before

s = mean|X|^α / mean|W|^(1-α), with α searched on calibration inputs to minimize the output error
of the quantized linears, or of the block they sit in (the attention block for q/k/v, the MLP for
gate/up), whose output weighs each linear's rounding by its effect downstream. Then each group's
range is clipped, searched on the linear's own output (and, with `refit_scales`, the row's group scales
then refitted on that output: pipeline.quant.refit). For the Llama family the foldable pairs
are: input_layernorm -> q,k,v; post_attention_layernorm -> gate,up; up_proj -> down_proj
(v_proj -> o_proj too when there is no grouped-query attention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.quant.primitives import Clip, QuantScheme, choose_qparams, fake_quantize, to_groups


def fake_quant(w: torch.Tensor, scheme: QuantScheme, clip: Clip = 1.0) -> torch.Tensor:
    """Round-to-nearest W [N, K] -> dequantized W (padding dropped)."""
    g = to_groups(w, scheme.group_size)
    scale, zero = choose_qparams(g, scheme, clip)
    return fake_quantize(g, scale[..., None], zero[..., None], scheme.maxq, scheme.float_zero).reshape(w.shape[0], -1)[
        :, : w.shape[1]
    ]


def scale_candidates(x_mean: torch.Tensor, weights: list[torch.Tensor], grid: int):
    """(α, s) for α = 0, 1/grid, …: s = mean|x|^α / mean|W|^(1-α), normalized so that max·min = 1."""
    w_all = torch.cat(weights, dim=0)
    w_mean = (w_all.abs() / w_all.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)).mean(dim=0)
    for i in range(grid):
        alpha = i / grid
        s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=1e-4)).clamp(min=1e-4)
        yield alpha, s / (s.max() * s.min()).sqrt()


def search_scale(
    x: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], schemes: list[QuantScheme], grid: int = 20
) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale s [K] for linears sharing input x [T, K]; returns (s, chosen α).

    The output error of a weight change D is |x Dᵀ|² = tr(D H Dᵀ) with H = xᵀx, so the search
    costs N·K² per candidate instead of T·N·K, and needs no [T, N] outputs.
    """
    gram = x.T @ x
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for alpha, s in scale_candidates(x_mean, weights, grid):
        err = 0.0
        for w, sc in zip(weights, schemes):
            d = fake_quant(w * s, sc) / s - w
            err += float(((d @ gram) * d).sum()) / (x.shape[0] * w.shape[0])
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def search_scale_on_output(
    x_mean: torch.Tensor,
    linears: list[torch.nn.Linear],
    schemes: list[QuantScheme],
    forward: Callable[[], torch.Tensor],
    grid: int = 20,
) -> tuple[torch.Tensor, float]:
    """Like search_scale, but the error is that of forward()'s output (the attention block or the MLP that the
    linears sit in), so each linear's rounding counts by what it does downstream, through softmax or SwiGLU.

    Each candidate sets the linears' weights to fake_quant(W s) / s, which computes exactly what the folded,
    quantized linears would; the weights are restored afterwards.
    """
    originals = [m.weight.data for m in linears]
    reference = forward().float()
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    try:
        for alpha, s in scale_candidates(x_mean, originals, grid):
            for m, w, sc in zip(linears, originals, schemes):
                m.weight.data = (fake_quant(w * s, sc) / s).to(w.dtype)
            err = float((forward().float() - reference).pow(2).mean())
            if err < best[0]:
                best = (err, s, alpha)
    finally:
        for m, w in zip(linears, originals):
            m.weight.data = w
    return best[1], best[2]


def search_clip(x: torch.Tensor, w: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5) -> Clip:
    """Per-group range clip [N, k_blocks] minimizing each group's contribution to the output error.

    A group's share of the error is dᵀ H_g d, with H_g the Gram matrix of its input channels.
    Asymmetric groups then refine their two ends apart, the low end and then the high end (a
    group's long tail is usually on one side; shrinking the other side as well wastes levels),
    and get (high, low) factors.
    """
    gs = scheme.group_size
    wg = to_groups(w, gs)  # [N, G, gs]
    xg = to_groups(x, gs)  # [T, G, gs]
    gram = torch.einsum("tgk,tgl->gkl", xg, xg)  # [G, gs, gs]
    steps = [1.0 - max_shrink * i / grid for i in range(grid)]
    best_err = torch.full(wg.shape[:2], float("inf"))
    top, bottom = torch.ones(wg.shape[:2]), torch.ones(wg.shape[:2])

    def improve(candidates) -> None:
        nonlocal best_err, top, bottom
        for t, b in candidates:
            t, b = torch.as_tensor(t).expand_as(top), torch.as_tensor(b).expand_as(top)
            scale, zero = choose_qparams(wg, scheme, (t, b))
            delta = (
                fake_quantize(wg, scale[..., None], zero[..., None], scheme.maxq, scheme.float_zero) - wg
            )  # [N, G, gs]
            err = (torch.einsum("ngk,gkl->ngl", delta, gram) * delta).sum(-1)  # [N, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            top, bottom = torch.where(better, t, top), torch.where(better, b, bottom)

    improve((c, c) for c in steps)
    if scheme.symmetric:
        return top
    improve([(top, torch.full_like(bottom, c)) for c in steps[::2]])
    improve([(torch.full_like(top, c), bottom) for c in steps[::2]])
    return top, bottom
