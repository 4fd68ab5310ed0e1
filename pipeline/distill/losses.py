"""Distillation losses, each a mean over the real (non-padded) next-token positions.

    kd      T² · KL(softmax(teacher / T) ‖ softmax(student / T))   (Hinton et al.; T² keeps the
            gradient scale independent of the temperature)
    hidden  per mapped layer pair, MSE or 1 - cosine between student and teacher hidden states
    ce      cross-entropy of the student on the data itself

The training loop takes `hidden_loss` from here; KD and cross-entropy it computes from the final hidden
states a chunk of positions at a time (pipeline/distill/head_loss.py), so that no whole batch of logits
is held. `kd_loss` and `ce_loss` are the full-logits definitions that its tests hold it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HIDDEN_LOSSES = ("mse", "cosine")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits [B, T, V] (positions already aligned) -> scalar."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl.mean() * t * t


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Hidden states [B, T, H] of one mapped layer pair -> scalar."""
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    raise ValueError(f"unknown hidden loss {kind!r}")


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V] predict ids shifted by one."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
