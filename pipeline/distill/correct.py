"""Teacher correction: fine-tune the teacher on the training text before the student imitates it.

A teacher that has never seen the text's domain is a poor target there: knowledge distillation pulls
the student towards the teacher's distribution, while cross-entropy on the text adapts it to the
domain, so on in-domain text plain fine-tuning wins (docs/notes/2026-12-06-distillation-on-smollm2.md). Minitron (Sreenivas et
al. 2024) corrects the teacher first: a short cross-entropy run on the distillation data, after which
the pruned student inherits adapted weights and learns from an adapted teacher.

The run is the distillation loop itself (pipeline/distill/train.py) with cross-entropy as the only
loss, on a copy of the teacher; its evaluations report the corrected teacher's held-out perplexity and
its KL to the original. The corrected weights are saved beside the training checkpoints, so a killed
distill step that is re-run does not correct twice. Under a launcher every process trains (each its
share of the batches) and process 0 saves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.configs import DistillConfig, DistillLossConfig
from pipeline.distill import sharding
from pipeline.distill.train import train
from pipeline.models import save_pretrained

CORRECTED = "corrected-teacher"
RECORD = "correction.json"


def correct_teacher(
    teacher,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    cfg: DistillConfig,
    checkpoints: Path,
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, dict]:
    """The teacher fine-tuned by `cfg.teacher_correction`, and what its training measured."""
    tc = cfg.teacher_correction
    saved = checkpoints / CORRECTED
    if (saved / RECORD).is_file():
        log(f"  teacher correction: read from the interrupted run ({saved})")
        return sharding.load(saved, cfg), json.loads((saved / RECORD).read_text())
    run_cfg = dataclasses.replace(cfg, tokens=tc.tokens, lr=tc.lr, loss=DistillLossConfig(kd=0.0, ce=1.0))
    log(f"  teacher correction: cross-entropy on the training text, {tc.tokens:,} tokens at lr {tc.lr:g}")
    model = copy.deepcopy(teacher)
    model, history = train(model, teacher, train_blocks, eval_blocks, {}, run_cfg, checkpoints / "correction", log)
    model = model.eval().requires_grad_(False)
    info = {
        "tokens": history.tokens_seen,
        "lr": tc.lr,
        "train_seconds": history.train_seconds,
        "heldout_perplexity": history.eval_ppl[-1],
        "kl_to_original": history.eval_kl[-1],
        "curve": [list(point) for point in zip(history.eval_steps, history.eval_ppl)],
    }
    if not distributed.is_main():  # DDP kept the processes' weights equal; under FSDP process 0 has them
        return model, info
    tmp = checkpoints / f"{CORRECTED}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    (tmp / RECORD).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(saved, ignore_errors=True)
    tmp.rename(saved)
    shutil.rmtree(checkpoints / "correction", ignore_errors=True)
    return model, info
