"""The least-squares refit of group scales (and float zero points), with or without coordinate descent on the
codes: never worse per row, better in total, layout unchanged."""

import pytest
import torch

from pipeline.quant.awq import search_clip
from pipeline.quant.gptq import gptq
from pipeline.quant.primitives import QuantScheme, dequantize, quantize, to_groups
from pipeline.quant.refit import descend_codes, padded_gram, refit_scales
from tests.pipeline.quant.test_gptq import correlated_inputs


def row_errors(x: torch.Tensor, w: torch.Tensor, qt) -> torch.Tensor:
    return (x @ (dequantize(qt) - w).T).pow(2).sum(0)


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(4, 32, False), QuantScheme(4, 32, True), QuantScheme(4, 64, False, True)],
    ids=["asym", "sym", "float-zero"],
)
def test_refit_after_the_awq_clip_search_lowers_every_rows_output_error(scheme):
    torch.manual_seed(0)
    x = correlated_inputs(1024, 100)  # 100 = whole blocks and a padded one
    w = torch.randn(24, 100)
    qt = quantize(w, scheme, search_clip(x, w, scheme))
    fitted = refit_scales(qt, w, padded_gram(x, scheme.group_size))
    before, after = row_errors(x, w, qt), row_errors(x, w, fitted)
    assert fitted.q.dtype == torch.uint8 and fitted.q.shape == qt.q.shape
    if scheme.float_zero:  # fitted with the scales
        assert not torch.equal(fitted.zero, qt.zero)
    else:  # integer zero points are the layout's: unchanged
        assert torch.equal(fitted.zero, qt.zero)
    assert int(fitted.q.max()) <= scheme.maxq and fitted.in_features == 100
    assert (after <= before * (1 + 1e-4)).all()
    assert after.sum() < 0.97 * before.sum()


def test_refit_of_gptq_codes_takes_the_unpadded_hessian_and_never_loses():
    torch.manual_seed(0)
    x = correlated_inputs(2048, 100)
    w = torch.randn(16, 100)
    h = x.T @ x
    qt = gptq(w, h, QuantScheme(4, 32, False))
    fitted = refit_scales(qt, w, 2 * h / len(x))  # any positive multiple of XᵀX
    before, after = row_errors(x, w, qt), row_errors(x, w, fitted)
    assert (after <= before * (1 + 1e-4)).all() and after.sum() < before.sum()


def test_refit_keeps_a_row_whose_scales_cannot_improve():
    """A weight already on its grid: zero error, nothing to gain, nothing changed."""
    scheme = QuantScheme(4, 32, False)
    w = dequantize(quantize(torch.randn(4, 64), scheme))
    qt = quantize(w, scheme)
    fitted = refit_scales(qt, w, padded_gram(torch.randn(256, 64), 32))
    torch.testing.assert_close(dequantize(fitted), dequantize(qt))


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(4, 32, False), QuantScheme(4, 32, True), QuantScheme(4, 64, False, True)],
    ids=["asym", "sym", "float-zero"],
)
def test_code_descent_cuts_the_refits_output_error_further(scheme):
    torch.manual_seed(0)
    x = correlated_inputs(1024, 100)
    w = torch.randn(24, 100)
    qt = quantize(w, scheme, search_clip(x, w, scheme))
    gram = padded_gram(x, scheme.group_size)
    plain, descended = refit_scales(qt, w, gram), refit_scales(qt, w, gram, descent=True)
    before, after = row_errors(x, w, qt), row_errors(x, w, descended)
    assert (after <= before * (1 + 1e-4)).all()
    assert after.sum() < 0.8 * row_errors(x, w, plain).sum()
    assert int(descended.q.max()) <= scheme.maxq and descended.q.dtype == torch.uint8


def test_code_descent_ends_where_no_single_code_can_move_for_the_better():
    """Run to convergence, every code is the best integer for its row given the others (brute-force check)."""
    torch.manual_seed(1)
    scheme = QuantScheme(4, 16, False)
    x = correlated_inputs(512, 48)
    w = torch.randn(3, 48)
    qt = quantize(w, scheme)
    gram = padded_gram(x, 16)
    wg = to_groups(w, 16)
    q = qt.q.float()
    for _ in range(50):
        moved = descend_codes(wg.reshape(3, -1), qt.scale, qt.zero, q, gram, scheme.maxq)
        if torch.equal(moved, q):
            break
        q = moved
    else:
        pytest.fail("coordinate descent did not settle in 50 passes")

    def err(codes):
        return row_errors(x, w, type(qt)(codes.to(torch.uint8), qt.scale, qt.zero, scheme, 48))

    base = err(q)
    for row in range(3):
        for j in range(48):
            for step in (-1, 1):
                trial = q.clone().view(3, 48)
                if not 0 <= trial[row, j] + step <= scheme.maxq:
                    continue
                trial[row, j] += step
                assert err(trial.view_as(q))[row] >= base[row] * (1 - 1e-5)


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 32, False), QuantScheme(4, 64, False, True)], ids=["asym", "float-zero"]
)
def test_refit_in_row_chunks_equals_all_rows_at_once(scheme):
    torch.manual_seed(0)
    x = correlated_inputs(512, 128)
    w = torch.randn(20, 128)
    qt = quantize(w, scheme)
    gram = padded_gram(x, scheme.group_size)
    whole = refit_scales(qt, w, gram, chunk=20, descent=True)
    for chunk in (1, 7):
        part = refit_scales(qt, w, gram, chunk=chunk, descent=True)
        assert torch.equal(part.q, whole.q)
        torch.testing.assert_close(part.scale, whole.scale, rtol=1e-4, atol=0)  # batched solves round differently
        torch.testing.assert_close(part.zero, whole.zero, rtol=1e-4, atol=0)


REFIT_MEMORY = """
import torch
from pipeline import resources
from pipeline.quant.primitives import QuantScheme, quantize
from pipeline.quant.refit import refit_scales
torch.manual_seed(0)
w = torch.randn({n}, {k})
x = torch.randn(4 * {k}, {k}) / 8
gram = x.T @ x
del x
qt = quantize(w, QuantScheme(4, {gs}, False))
assert resources.reset_peaks()
start = resources.peaks(True)["rss_mb"]
refit_scales(qt, w, gram, rounds=1)
print(resources.peaks(True)["peak_rss_mb"] - start)
"""


def test_the_refits_temporaries_stay_near_the_layers_own_size():
    """A 2048 x 4096 layer in groups of 32: all rows at once would hold 2048 sets of [128, 128] systems and
    [4096] vectors (670 MB) for a 32 MiB weight; in chunks the growth stays near the 256 MiB floor. Measured in
    a fresh process: after hundreds of tests the allocator's free lists, not the refit, decide this one's peak
    (the same code: 689 MB late in one full-suite run, 346 MB alone)."""
    import subprocess
    import sys

    from pipeline.quant.refit import MIN_BUDGET, rows_per_chunk

    n, k, gs = 2048, 4096, 32
    groups = k // gs
    assert rows_per_chunk(n, k, groups) < n
    assert rows_per_chunk(n, k, groups) * 4 * (3 * groups * groups + 8 * k) <= MIN_BUDGET
    script = REFIT_MEMORY.format(n=n, k=k, gs=gs)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = float(done.stdout.split()[-1])
    assert grown < 400, f"the refit grew the RSS by {grown:.0f} MB"


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 32, False), QuantScheme(4, 64, False, True)], ids=["asym", "float-zero"]
)
def test_rows_that_a_round_leaves_unchanged_stop_and_the_result_is_that_of_every_round(scheme, monkeypatch):
    from pipeline.quant import refit

    torch.manual_seed(0)
    x = correlated_inputs(512, 128)
    w = torch.randn(40, 128)
    qt = quantize(w, scheme)
    gram = padded_gram(x, scheme.group_size)
    every = refit_scales(qt, w, gram, rounds=1, chunk=40)
    for _ in range(5):  # each round run on every row, from the previous round's result
        every = refit_scales(every, w, gram, rounds=1, chunk=40)

    sizes = []
    run_round = refit._refit_round
    monkeypatch.setattr(refit, "_refit_round", lambda wg, *a, **k: sizes.append(len(wg)) or run_round(wg, *a, **k))
    stopping = refit_scales(qt, w, gram, rounds=6, chunk=40)
    assert sizes[0] == 40 and sizes[-1] < 40, sizes  # some rows settled and were not refitted again
    assert torch.equal(stopping.q, every.q)
    torch.testing.assert_close(stopping.scale, every.scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(stopping.zero, every.zero, rtol=1e-5, atol=0)
