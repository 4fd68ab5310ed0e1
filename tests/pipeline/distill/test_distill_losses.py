"""Distillation losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.distill.losses import ce_loss, hidden_loss, kd_loss


def test_kd_is_zero_for_equal_logits_and_the_kl_otherwise():
    logits = torch.randn(2, 3, 5)
    assert float(kd_loss(logits, logits, 2.0)) == pytest.approx(0, abs=1e-6)
    student = torch.tensor([[[0.0, 0.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])  # teacher p = (0.75, 0.25), student q = (0.5, 0.5)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_loss(student, teacher, 1.0)) == pytest.approx(kl, rel=1e-5)
    # temperature 2: p = softmax(log3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1); times T² = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert float(kd_loss(student, teacher, 2.0)) == pytest.approx(4 * kl2, rel=1e-5)


def test_hidden_losses():
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.0, 2.0]]])
    assert float(hidden_loss(a, a, "cosine")) == pytest.approx(0, abs=1e-6)
    assert float(hidden_loss(a, b, "cosine")) == pytest.approx(1.0)
    assert float(hidden_loss(a, b, "mse")) == pytest.approx((1 + 4) / 2)


def test_ce_predicts_the_next_token():
    logits = torch.randn(2, 4, 7)
    ids = torch.randint(0, 7, (2, 4))
    ref = torch.nn.functional.cross_entropy(logits[:, :3].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert float(ce_loss(logits, ids)) == pytest.approx(float(ref), rel=1e-6)
