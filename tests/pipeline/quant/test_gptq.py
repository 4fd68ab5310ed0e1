"""GPTQ against round-to-nearest on inputs with correlated features: it must reconstruct better."""

import pytest
import torch

from pipeline.quant.gptq import HessianAccumulator, gptq
from pipeline.quant.primitives import QuantScheme, dequantize, quantize


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]  # a few salient channels
    return (torch.randn(tokens, k, generator=g) @ mix + 0.3 * torch.randn(tokens, k, generator=g)) * scale


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_output_error_is_below_rtn(act_order, symmetric):
    torch.manual_seed(0)
    n, k = 64, 256
    w = torch.randn(n, k)
    x = correlated_inputs(2048, k)
    acc = HessianAccumulator(k)
    acc.add(x[:1000])
    acc.add(x[1000:])
    scheme = QuantScheme(4, 32, symmetric)
    rtn_err = (x @ (dequantize(quantize(w, scheme)) - w).T).pow(2).mean()
    gptq_err = (x @ (dequantize(gptq(w, acc.H, scheme, act_order=act_order)) - w).T).pow(2).mean()
    assert gptq_err < 0.7 * rtn_err


def test_hessian_accumulates_the_mean_outer_product():
    x = torch.randn(100, 8)
    acc = HessianAccumulator(8)
    for part in x.split(30):
        acc.add(part)
    torch.testing.assert_close(acc.H, 2 * x.T @ x / 100, rtol=1e-4, atol=1e-5)


def test_blocked_gram_equals_the_full_product():
    from pipeline.quant.gptq import add_gram

    x = torch.randn(300, 600)  # two uneven blocks of columns
    H = torch.ones(600, 600)
    add_gram(H, x, 0.5)
    torch.testing.assert_close(H, 1 + 0.5 * x.T @ x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_hessian_rejects_nan_and_inf_in_any_column(bad):
    x = torch.randn(50, 600)
    x[17, 599] = bad
    with pytest.raises(FloatingPointError):
        HessianAccumulator(600).add(x)


def test_hessian_rejects_nan():
    acc = HessianAccumulator(4)
    with pytest.raises(FloatingPointError):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


def test_gptq_codes_fit_matmul_nbits_layout_with_padding():
    w = torch.randn(8, 100)
    qt = gptq(w, torch.eye(100), QuantScheme(4, 32, False))
    assert qt.q.shape == (8, 4, 32) and qt.in_features == 100
    assert dequantize(qt).shape == (8, 100)


def test_awq_scale_and_clip_reduce_output_error_below_rtn():
    """Inputs with a few large channels: the activation-aware scale protects them."""
    from pipeline.quant.awq import fake_quant, search_clip, search_scale

    torch.manual_seed(0)
    k = 256
    x = torch.randn(1024, k)
    x[:, :8] *= 30  # salient channels
    w = torch.randn(64, k)
    scheme = QuantScheme(4, 32, False)
    ref = x @ w.T
    rtn = (x @ fake_quant(w, scheme).T - ref).pow(2).mean()
    s, alpha = search_scale(x, x.abs().mean(0), [w], [scheme])
    assert alpha > 0
    scaled = (x / s) @ fake_quant(w * s, scheme).T
    awq = (scaled - ref).pow(2).mean()
    clip = search_clip(x / s, w * s, scheme)
    clipped = (x / s) @ dequantize(quantize(w * s, scheme, clip)).T
    assert awq < 0.8 * rtn
    assert (clipped - ref).pow(2).mean() <= awq * 1.0001


def test_awq_scale_judged_by_a_swiglu_output_beats_rtn_there_and_restores_the_weights():
    """gate/up judged by the MLP's output: the chosen scale lowers that output's error and leaves W as it was."""
    from pipeline.quant.awq import fake_quant, search_scale_on_output

    torch.manual_seed(0)
    k, n = 128, 96
    x = torch.randn(512, k)
    x[:, :4] *= 25  # salient channels
    gate, up, down = (
        torch.nn.Linear(k, n, bias=False),
        torch.nn.Linear(k, n, bias=False),
        torch.nn.Linear(n, k, bias=False),
    )

    def mlp(x=x):
        return down(torch.nn.functional.silu(gate(x)) * up(x))

    scheme = QuantScheme(4, 32, False)
    before = [gate.weight.data.clone(), up.weight.data.clone()]
    with torch.no_grad():
        ref = mlp()
        s, alpha = search_scale_on_output(x.abs().mean(0), [gate, up], [scheme, scheme], mlp)
        assert torch.equal(gate.weight.data, before[0]) and torch.equal(up.weight.data, before[1])

        def err(scale):
            g, u = fake_quant(before[0] * scale, scheme) / scale, fake_quant(before[1] * scale, scheme) / scale
            return (down(torch.nn.functional.silu(x @ g.T) * (x @ u.T)) - ref).pow(2).mean()

        assert alpha > 0
        assert err(s) < 0.8 * err(torch.ones(k))


def test_awq_asymmetric_clip_refines_the_two_ends_apart_and_never_loses_to_one_shared_factor():
    from pipeline.quant.awq import search_clip
    from pipeline.quant.primitives import choose_qparams, fake_quantize, to_groups

    torch.manual_seed(0)
    x = torch.randn(512, 64)
    w = torch.randn(16, 64)
    w[w > 0] *= 0.3  # skewed groups: the long tail is on the low side
    scheme = QuantScheme(4, 32, False)
    wg, xg = to_groups(w, 32), to_groups(x, 32)
    gram = torch.einsum("tgk,tgl->gkl", xg, xg)

    def group_err(clip):
        scale, zero = choose_qparams(wg, scheme, clip)
        d = fake_quantize(wg, scale[..., None], zero[..., None], scheme.maxq) - wg
        return (torch.einsum("ngk,gkl->ngl", d, gram) * d).sum(-1)

    shared = torch.stack([group_err(1.0 - 0.5 * i / 20) for i in range(20)]).amin(0)  # best single factor per group
    top, bottom = search_clip(x, w, scheme)
    assert (group_err((top, bottom)) <= shared * (1 + 1e-6)).all()
    assert group_err((top, bottom)).sum() < 0.99 * shared.sum() and (top != bottom).any()
