"""The training loop's data order and its handling of a student copied from a frozen model."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.configs import DistillConfig
from pipeline.distill.prune import prune_depth
from pipeline.distill.train import batch_indices, train


def test_each_epoch_visits_every_block_once_and_ranks_never_share_a_row():
    cfg = DistillConfig(num_layers=1, batch_size=2, grad_accum=2, seed=3)
    epoch = np.concatenate([batch_indices(step, micro, 12, cfg) for step in range(3) for micro in range(2)])
    assert sorted(epoch.tolist()) == list(range(12))
    assert np.array_equal(batch_indices(5, 1, 12, cfg), batch_indices(5, 1, 12, cfg))  # a pure function of the step
    ranks = [batch_indices(0, 0, 12, cfg, rank, 2) for rank in range(2)]
    assert not set(ranks[0]) & set(ranks[1])


def test_a_student_copied_from_a_frozen_teacher_trains(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    student = prune_depth(teacher, [1])
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    blocks = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(
        num_layers=1,
        sequence_length=16,
        batch_size=2,
        grad_accum=1,
        tokens=64,
        bf16="false",
        eval_every=100,
        checkpoint_every=100,
        eval_samples=2,
    )
    trained, history = train(student, teacher, blocks, blocks[:2], {0: 1}, cfg, tmp_path / "ckpt", lambda _msg: None)
    assert trained is student  # alone (and under DDP) the student is trained in place
    assert len(history.loss) == 2 and all(np.isfinite(history.loss))
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)
