"""KD and cross-entropy from the final hidden states, a chunk of positions at a time.

The KD and cross-entropy terms need the student's and the teacher's logits at every position:
batch × length × vocabulary floats each. With a 49k- to 152k-word vocabulary these, their softmaxes
and their gradients outweigh every other activation of a training step (at 4 × 256 tokens and 49,152
words, each such tensor is 201 MB in float32, and autograd keeps several). So the models' heads do
not run in their forward passes:

    teacher(ids) ─► final hidden states h_t      (its head returns its input: `returning_hidden`)
    student(ids) ─► final hidden states h_s ─► its head, `returning_loss`, for each chunk of positions:
                       z_s = h_s W_sᵀ, z_t = h_t W_tᵀ ─► KD and CE terms, and ∂loss/∂z_s
                       ─► ∂loss/∂h_s (rows of the chunk) and ∂loss/∂W_s (summed over chunks)

Only one chunk's logits exist at a time (about CHUNK_ELEMENTS floats each). The gradients with
respect to the hidden states and the head's weight are formed in the forward pass, the way Liger
Kernel's fused linear cross-entropy does, so backward only scales them: nothing is recomputed. The
loss is computed inside the student's forward (its head), so DDP and FSDP see an ordinary forward; under
FSDP the teacher's head weight is read while its root unit is gathered (sharding.unsharded).

Numerics follow the full-logits losses (pipeline/distill/losses.py): logits in the autocast dtype
when autocast is on, upcast to float32 for the softmaxes; KD is the mean over every position of
T² · KL(teacher_T ‖ student_T), cross-entropy the mean over positions that have a next token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import StageError

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (rows × vocabulary): 32 MiB in float32
IGNORE = -100  # target of a position with no next token
# families whose causal-LM forward returns the head's output as the logits, untouched (no soft-capping or
# scaling after the head, as Gemma 2 and Cohere apply): there the head can stand in for the loss
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def check_family(config) -> None:
    """A clear error for a model whose logits are not just its head's output."""
    family = getattr(config, "model_type", "?")
    if family not in FAMILIES:
        raise StageError(
            f"distill: model family '{family}' is not supported (supported: {', '.join(FAMILIES)}); "
            "the loop computes KD and cross-entropy inside the head and needs a forward that returns "
            "the head's output unchanged"
        )


@dataclass(frozen=True)
class Terms:
    """Weights of the two terms (0: not computed) and the KD temperature."""

    kd: float = 0.0
    ce: float = 0.0
    temperature: float = 1.0


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> [B·T] targets: position t predicts ids[t + 1]; a row's last position predicts nothing."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return targets.reshape(-1)


@contextlib.contextmanager
def returning_hidden(model):
    """Inside, `model(...).logits` are its final hidden states [B, T, H]: its head is skipped."""
    with _head_runs(model, _identity):
        yield


@contextlib.contextmanager
def returning_loss(
    model,
    targets: torch.Tensor,
    terms: Terms,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.nn.Module | None = None,
):
    """Inside, `model(...).logits` is (loss, kd, ce): its head computes the weighted loss (differentiable)
    and the two terms' values from its final hidden states, `targets` (next_token_targets) and, for KD,
    the teacher's final hidden states and head."""
    if terms.kd and (teacher_hidden is None or teacher_head is None):
        raise ValueError("the KD term needs the teacher's final hidden states and head")
    head = model.get_output_embeddings()

    def loss(hidden: torch.Tensor):
        teacher = (teacher_hidden, teacher_head.weight, teacher_head.bias) if terms.kd else (None, None, None)
        return _ChunkedHeadLoss.apply(hidden, head.weight, head.bias, *teacher, targets, terms)

    with _head_runs(model, loss):
        yield


@contextlib.contextmanager
def _head_runs(model, forward):
    """Inside, the model's head module runs `forward` instead of its own (any forward that a hook library
    had set on the instance is put back after)."""
    head = model.get_output_embeddings()
    previous = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, terms: Terms):
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        with torch.autocast(device, enabled=False):
            h = hidden.reshape(-1, hidden.shape[-1])
            hc, w = h.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            if terms.kd:
                th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(dtype)
                tw = teacher_weight.to(dtype)
                tb = teacher_bias.to(dtype) if teacher_bias is not None else None
            n = h.shape[0]
            n_ce = max(1, int((targets != IGNORE).sum()))
            t = terms.temperature
            kd_sum = torch.zeros((), device=hidden.device)
            ce_sum = torch.zeros((), device=hidden.device)
            if want_grad:
                dh = torch.zeros_like(h)
                dw = torch.zeros_like(weight)
                db = torch.zeros_like(bias) if bias is not None else None
            rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
            for start in range(0, n if terms.kd or terms.ce else 0, rows):  # neither: the hidden-state loss alone
                part = slice(start, start + rows)
                z = F.linear(hc[part], w, b).float()
                dz = torch.zeros_like(z) if want_grad else None
                if terms.kd:
                    log_q = F.log_softmax(z / t, dim=-1)
                    log_p = F.log_softmax(F.linear(th[part], tw, tb).float() / t, dim=-1)
                    p = log_p.exp()
                    kd_sum += (p * (log_p - log_q)).sum()
                    if want_grad:  # ∂(T²·KL)/∂z = T·(softmax(z/T) − p)
                        dz.add_(log_q.exp_().sub_(p), alpha=terms.kd * t / n)
                    del log_q, log_p, p
                if terms.ce:
                    target = targets[part]
                    valid = target != IGNORE
                    positions, wanted = valid.nonzero()[:, 0], target[valid]
                    log_s = F.log_softmax(z, dim=-1)
                    ce_sum -= log_s[positions, wanted].sum()
                    if want_grad:  # ∂CE/∂z = softmax(z) − one-hot(target), on positions with a target
                        g = log_s.exp_()
                        g[positions, wanted] -= 1
                        g[~valid] = 0
                        dz.add_(g, alpha=terms.ce / n_ce)
                    del log_s
                if want_grad:
                    dzc = dz.to(dtype)
                    dh[part] = (dzc @ w).to(h.dtype)
                    dw += (dzc.t() @ hc[part]).to(dw.dtype)
                    if db is not None:
                        db += dz.sum(0).to(db.dtype)
                del z, dz
        kd = kd_sum * (t * t / n)
        ce = ce_sum / n_ce
        total = terms.kd * kd + terms.ce * ce
        if want_grad:
            ctx.save_for_backward(dh.reshape(hidden.shape), dw, db)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        # scaled in place: the head weight's gradient is as large as the head, so no second copy of it is
        # made (this graph is differentiated once: the loop never retains it)
        dh, dw, db = ctx.saved_tensors
        return (
            dh.mul_(grad_total),
            dw.mul_(grad_total),
            db.mul_(grad_total) if db is not None else None,
            None,
            None,
            None,
            None,
            None,
        )
