"""Block Hadamard rotation for W8A8: exact in float, and it spreads a token's spikes before rounding."""

import numpy as np
import pytest
import torch

from pipeline.quant.rotation import hadamard, rotate


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_hadamard_is_orthonormal_and_its_own_inverse(n):
    h = hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(h, h.T)
    assert np.all(np.abs(np.abs(h) - 1 / np.sqrt(n)) < 1e-7)  # every entry mixes: no channel is left alone


def test_hadamard_of_a_width_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError, match="not a power of two"):
        hadamard(96)


def test_rotation_is_block_diagonal_and_leaves_a_linear_unchanged():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 256, generator=g), torch.randn(40, 256, generator=g)
    q = torch.block_diag(*[torch.from_numpy(hadamard(128))] * 2)
    torch.testing.assert_close(rotate(x), x @ q)
    torch.testing.assert_close(rotate(x) @ rotate(w).T, x @ w.T, atol=1e-4, rtol=1e-4)


def test_rotation_spreads_a_spike_so_one_static_scale_rounds_the_rest_finer():
    from pipeline.stages.quantize.w8a8 import fake_quant_static, fake_quant_weight

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 256, generator=g), torch.randn(64, 256, generator=g) / 16
    x[7, 3] = 60.0  # one token with one huge channel: it sets the static range

    def error(rot):
        xr, wr = (rotate(x), rotate(w)) if rot else (x, w)
        scale = float(xr.abs().max()) / 127
        return float((fake_quant_static(xr, scale) @ fake_quant_weight(wr).T - x @ w.T).pow(2).mean())

    assert rotate(x).abs().max() < x.abs().max() / 4
    assert error(True) < error(False) / 4
