"""Build a smaller student from the teacher: drop decoder layers, narrow the MLPs, drop KV-head groups.

Every kept tensor is copied from the teacher, so the student starts as close to it as its shape allows:

    depth   keep `num_layers` of the teacher's layers, chosen uniformly (first and last always kept)
            or by measured importance on calibration blocks:
              loss    the cross-entropy increase when only that layer is skipped
              hidden  block influence, 1 - cos(layer input, layer output) averaged over tokens
    MLP     keep the `intermediate_size` channels whose |silu(gate)·up| · ‖down column‖ is largest
    heads   keep the KV groups (one KV head and the query heads that read it) whose share of the
            attention output (|o_proj input| over the group's channels) is largest: GQA stays valid

All functions work on Llama-family models (Llama, Mistral, Qwen2, Qwen3) and leave `config` consistent.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

from calibration.collect import decoder_layers, input_hooks
from pipeline.errors import StageError

LAYER_CHOICES = ("uniform", "loss", "hidden")


@contextlib.contextmanager
def _without_layer(model, index: int):
    """Run the model as if layer `index` were not there (no cache is used while scoring)."""
    layers = decoder_layers(model)
    model.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i != index])
    model.config.num_hidden_layers -= 1
    try:
        yield
    finally:
        model.model.layers = layers
        model.config.num_hidden_layers += 1


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Next-token cross-entropy over blocks [N, T]."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size].to(device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        total += float(out.loss) * ids.numel()
        count += ids.numel()
    return total / count


@torch.no_grad()
def layer_importance(model, blocks: torch.Tensor, how: str) -> list[float]:
    """One score per decoder layer; higher means the model needs the layer more."""
    if how == "loss":
        base = mean_loss(model, blocks)
        scores = []
        for i in range(len(decoder_layers(model))):
            with _without_layer(model, i):
                scores.append(mean_loss(model, blocks) - base)
        return scores
    if how == "hidden":
        sums = np.zeros(len(decoder_layers(model)))
        device = next(model.parameters()).device
        for i in range(0, len(blocks), 4):
            ids = blocks[i : i + 4].to(device)
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            for layer in range(len(sums)):  # hidden[l] is layer l's input, hidden[l + 1] its output
                cos = torch.nn.functional.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1)
                sums[layer] += float((1 - cos).sum())
        return (sums / blocks.numel()).tolist()
    raise ValueError(f"unknown importance measure {how!r}")


def choose_layers(num_teacher: int, keep: int, how: str, scores: list[float] | None = None) -> list[int]:
    """Indices of the teacher layers the student keeps, in order."""
    if not 1 <= keep <= num_teacher:
        raise StageError(f"distill.num_layers: {keep} is not between 1 and the teacher's {num_teacher} layers")
    if how == "uniform":
        return sorted({int(round(x)) for x in np.linspace(0, num_teacher - 1, keep)})
    order = np.argsort(-np.asarray(scores), kind="stable")  # most important first
    return sorted(int(i) for i in order[:keep])


def prune_depth(teacher, keep: list[int]):
    """A copy of the teacher holding only the layers in `keep` (renumbered for the KV cache)."""
    student = copy.deepcopy(teacher)
    layers = decoder_layers(teacher)
    student.model.layers = torch.nn.ModuleList([copy.deepcopy(layers[i]) for i in keep])
    for new, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [teacher.config.layer_types[i] for i in keep]
    return student


@torch.no_grad()
def _input_magnitudes(model, blocks: torch.Tensor, module_name: str) -> list[torch.Tensor]:
    """Mean |input| per channel of `layers[i].<module_name>` for every layer, over the blocks."""
    modules = {f"{i}": layer.get_submodule(module_name) for i, layer in enumerate(decoder_layers(model))}
    sums: dict[str, torch.Tensor] = {}

    def sink(name: str, x: torch.Tensor) -> None:
        total = x.abs().reshape(-1, x.shape[-1]).sum(0)
        sums[name] = sums[name] + total if name in sums else total

    device = next(model.parameters()).device
    with input_hooks(modules, sink):
        for i in range(0, len(blocks), 4):
            model(input_ids=blocks[i : i + 4].to(device), use_cache=False)
    return [sums[name] / blocks.numel() for name in modules]


def prune_mlp(model, size: int, blocks: torch.Tensor) -> None:
    """Keep the `size` most active intermediate channels of every MLP, in place."""
    current = model.config.intermediate_size
    if not 1 <= size <= current:
        raise StageError(f"distill.intermediate_size: {size} is not between 1 and the teacher's {current}")
    if size == current:
        return
    activity = _input_magnitudes(model, blocks, "mlp.down_proj")
    for layer, act in zip(decoder_layers(model), activity):
        mlp = layer.mlp
        score = act * mlp.down_proj.weight.norm(dim=0)
        keep = torch.sort(torch.topk(score, size).indices).values
        _narrow(mlp.gate_proj, keep, dim=0)
        _narrow(mlp.up_proj, keep, dim=0)
        _narrow(mlp.down_proj, keep, dim=1)
    model.config.intermediate_size = size


def prune_kv_groups(model, kv_heads: int, blocks: torch.Tensor) -> None:
    """Keep `kv_heads` KV groups per layer (each with its query heads), in place."""
    cfg = model.config
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if not 1 <= kv_heads <= groups:
        raise StageError(f"distill.num_key_value_heads: {kv_heads} is not between 1 and the teacher's {groups}")
    if kv_heads == groups:
        return
    per_group = heads // groups
    activity = _input_magnitudes(model, blocks, "self_attn.o_proj")
    for layer, act in zip(decoder_layers(model), activity):
        attn = layer.self_attn
        group_score = (act * attn.o_proj.weight.norm(dim=0)).reshape(groups, per_group * head_dim).sum(-1)
        kept = torch.sort(torch.topk(group_score, kv_heads).indices).values
        q_rows = torch.cat(
            [torch.arange(g * per_group * head_dim, (g + 1) * per_group * head_dim) for g in kept.tolist()]
        )
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in kept.tolist()])
        _narrow(attn.q_proj, q_rows, dim=0)
        _narrow(attn.k_proj, kv_rows, dim=0)
        _narrow(attn.v_proj, kv_rows, dim=0)
        _narrow(attn.o_proj, q_rows, dim=1)
        attn.num_key_value_groups = per_group
        if hasattr(attn, "num_heads"):
            attn.num_heads = kv_heads * per_group
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = kv_heads
    cfg.head_dim = head_dim  # hidden_size / heads no longer gives it
    cfg.num_attention_heads = kv_heads * per_group
    cfg.num_key_value_heads = kv_heads


def _narrow(linear: torch.nn.Linear, keep: torch.Tensor, dim: int) -> None:
    keep = keep.to(linear.weight.device)
    linear.weight = torch.nn.Parameter(linear.weight.detach().index_select(dim, keep).clone())
    if dim == 0 and linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.detach().index_select(0, keep).clone())
    if dim == 0:
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def parameters_per_layer(model) -> int:
    return sum(p.numel() for p in decoder_layers(model)[0].parameters())


def layers_for_budget(model, budget_m: float) -> int:
    """The most layers whose student fits `budget_m` million parameters (embeddings and head included)."""
    per_layer = parameters_per_layer(model)
    fixed = sum(p.numel() for p in model.parameters()) - per_layer * len(decoder_layers(model))
    layers = int((budget_m * 1e6 - fixed) // per_layer)
    if layers < 1:
        raise StageError(
            f"distill.param_budget_m: {budget_m}M cannot hold even one layer "
            f"(embeddings and head alone are {fixed / 1e6:.1f}M, a layer {per_layer / 1e6:.2f}M)"
        )
    return min(layers, len(decoder_layers(model)))
