"""Student construction: which teacher weights are copied, shapes that stay valid, layer choices."""

from __future__ import annotations

import pytest
import torch

from pipeline.distill.prune import (
    choose_layers,
    layer_importance,
    layers_for_budget,
    prune_depth,
    prune_kv_groups,
    prune_mlp,
)
from pipeline.errors import StageError


def _teacher(layers: int = 6, family: str = "llama"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _blocks(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(1))


def test_depth_pruning_copies_the_kept_layers_and_renumbers_them():
    teacher = _teacher()
    student = prune_depth(teacher, [0, 2, 5])
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for new, old in enumerate([0, 2, 5]):
        s, t = student.model.layers[new], teacher.model.layers[old]
        assert torch.equal(s.mlp.down_proj.weight, t.mlp.down_proj.weight)
        assert s.self_attn.layer_idx == new
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert teacher.config.num_hidden_layers == 6  # the teacher is untouched
    student(input_ids=_blocks())  # runs


def test_uniform_choice_keeps_first_and_last():
    assert choose_layers(30, 20, "uniform")[0] == 0 and choose_layers(30, 20, "uniform")[-1] == 29
    assert len(choose_layers(30, 20, "uniform")) == 20
    assert choose_layers(6, 3, "loss", [0.5, 0.1, 0.9, 0.2, 0.05, 1.0]) == [0, 2, 5]
    with pytest.raises(StageError, match="distill.num_layers: 31 is not between 1 and the teacher's 30 layers"):
        choose_layers(30, 31, "uniform")


@pytest.mark.parametrize("how", ["loss", "hidden"])
def test_a_layer_that_does_nothing_scores_zero(how):
    """Zero a layer's two output projections: it passes the residual through unchanged, so skipping it
    changes neither the loss nor the hidden state. Block influence is never negative, so that layer
    ranks last; the loss change of a random model's layers can be negative (skipping helps), so only
    its zero is checked there."""
    teacher = _teacher()
    with torch.no_grad():
        teacher.model.layers[3].self_attn.o_proj.weight.zero_()
        teacher.model.layers[3].mlp.down_proj.weight.zero_()
    scores = layer_importance(teacher, _blocks(), how)
    assert len(scores) == 6 and abs(scores[3]) < 1e-5
    assert all(abs(s) > 1e-4 for i, s in enumerate(scores) if i != 3)
    if how == "hidden":
        assert 3 not in choose_layers(6, 5, how, scores)


def test_mlp_pruning_keeps_the_most_active_channels():
    teacher = _teacher()
    student = prune_depth(teacher, list(range(6)))
    prune_mlp(student, 40, _blocks())
    assert student.config.intermediate_size == 40
    mlp, t_mlp = student.model.layers[1].mlp, teacher.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == (40, 64) and mlp.down_proj.weight.shape == (64, 40)
    # every kept row of gate_proj is a teacher row, and up/down were cut at the same channels
    rows = [int((t_mlp.gate_proj.weight == r).all(1).nonzero()) for r in mlp.gate_proj.weight]
    assert rows == sorted(rows)
    assert torch.equal(mlp.up_proj.weight, t_mlp.up_proj.weight[rows])
    assert torch.equal(mlp.down_proj.weight, t_mlp.down_proj.weight[:, rows])
    student(input_ids=_blocks())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_group_pruning_keeps_gqa_valid(family):
    teacher = _teacher(family=family)
    student = prune_depth(teacher, list(range(6)))
    prune_kv_groups(student, 2, _blocks())
    cfg = student.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 8)
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32)
    out = student(input_ids=_blocks()).logits
    assert torch.isfinite(out).all()
    with pytest.raises(StageError, match="num_key_value_heads: 5 is not between 1 and the teacher's 2"):
        prune_kv_groups(student, 5, _blocks())


def test_parameter_budget_gives_the_depth():
    teacher = _teacher()
    per_layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    fixed = sum(p.numel() for p in teacher.parameters()) - 6 * per_layer
    assert layers_for_budget(teacher, (fixed + 4 * per_layer + 10) / 1e6) == 4
    with pytest.raises(StageError, match="cannot hold even one layer"):
        layers_for_budget(teacher, fixed / 2e6)
