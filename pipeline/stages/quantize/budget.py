"""Mixed precision by measurement: how much each linear layer alone hurts, then INT8 where it pays.

    sensitivity(layer) = mean KL(p_float || p_with_only_this_layer_int4) on calibration tokens

A size budget upgrades layers to INT8 in order of sensitivity per extra byte while the estimated
weight size stays within it. A perplexity budget upgrades the most sensitive layers, in steps,
until the perplexity increase measured on calibration text (round-to-nearest stand-in for the
chosen method) is within it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from calibration.collect import capture_layer_inputs, decoder_layers, run_layer
from pipeline.configs import BudgetConfig
from pipeline.errors import StageError
from pipeline.quant.awq import fake_quant
from pipeline.quant.primitives import QuantScheme, packed_bytes, quantize


def sensitivities(model, plan: dict[str, QuantScheme], ids: torch.Tensor) -> dict[str, float]:
    """KL of the output when only that layer is quantized with its planned scheme.

    The decoder layers before a candidate compute the same thing with or without it quantized, so
    the input of every decoder layer is captured once and each candidate's forward starts at its own
    layer: about half the work of a whole forward per candidate. Where the head is not norm → lm_head
    (checked against the model's own logits), every candidate runs the whole model instead, and so
    does a head tied to the embedding (quantizing it changes the model's input too).
    """
    layers = decoder_layers(model)
    with torch.no_grad():
        full = model(ids).logits
        hidden, kwargs = capture_layer_inputs(model, [ids])
        entering = [hidden]  # entering[i]: what decoder layer i sees; entering[-1]: the final hidden state
        for layer in layers:
            entering.append(run_layer(layer, entering[-1], kwargs))
        shortcut = _head_logits(model, entering[-1][0])
        if shortcut is None or not torch.allclose(shortcut, full, rtol=1e-4, atol=1e-3):
            entering = None
        ref = F.log_softmax(full.double(), -1)
        p_ref = ref.exp()
        neg_entropy = (p_ref * ref).sum(-1)
        out = {}
        for name in tqdm(plan, desc="  sensitivity", unit="layer", leave=False):
            module = model.get_submodule(name)
            original = module.weight.data
            module.weight.data = fake_quant(original, plan[name])
            try:
                if entering is None or module.weight is model.get_input_embeddings().weight:
                    logits = model(ids).logits  # a tied head changes the embedding too: the whole forward
                else:
                    start = _layer_index(name, len(layers))
                    h = entering[start]
                    for layer in layers[start:]:
                        h = run_layer(layer, h, kwargs)
                    logits = _head_logits(model, h[0])
            finally:
                module.weight.data = original
            z = logits.double()  # KL = Σ p log p - Σ p (z - logsumexp z), and Σ p = 1
            kl = neg_entropy - torch.linalg.vecdot(p_ref, z) + torch.logsumexp(z, -1)
            out[name] = max(0.0, float(kl.mean()))  # >= 0 up to round-off
    return out


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor | None:
    """Logits from the last decoder layer's output, for models whose head is final norm then lm_head."""
    norm, head = getattr(model.model, "norm", None), getattr(model, "lm_head", None)
    return None if norm is None or head is None else head(norm(hidden))


def _layer_index(name: str, count: int) -> int:
    """The decoder layer a module belongs to; `count` (after the last) for the head."""
    found = re.match(r"model\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else count


EMBEDDING = "model.embed_tokens"


def weight_bytes(model, plan: dict[str, QuantScheme], embedding: QuantScheme | str | None = None) -> int:
    """Estimated bytes of the exported weights: packed quantized layers plus every float tensor left.

    `embedding`: None (float), a scheme (its own quantized copy), or "shared" (reads the head's codes).
    """
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        scheme = plan.get(name) if name != EMBEDDING else (None if embedding in (None, "shared") else embedding)
        if name == EMBEDDING and embedding == "shared":
            continue
        if scheme is not None:
            total += packed_bytes(quantize(module.weight.data[:1], scheme)) * module.weight.shape[0]
        else:
            total += module.weight.numel() * 4
    return total


def choose(
    model,
    plan: dict[str, QuantScheme],
    budget: BudgetConfig,
    ids: torch.Tensor,
    embedding: QuantScheme | str | None,
    log: Callable[[str], None],
) -> tuple[dict[str, QuantScheme], dict]:
    """The plan with some INT4 layers raised to INT8, and a record of why."""
    candidates = {n: s for n, s in plan.items() if s.bits == 4}
    sens = sensitivities(model, candidates, ids)
    as8 = {n: QuantScheme(8, s.group_size, s.symmetric) for n, s in candidates.items()}
    extra = {n: _packed(model, n, as8[n]) - _packed(model, n, candidates[n]) for n in candidates}
    order = sorted(candidates, key=lambda n: sens[n] / max(extra[n], 1), reverse=True)
    chosen: list[str] = []
    if budget.max_size_mb is not None or budget.max_size_ratio is not None:
        size = weight_bytes(model, plan, embedding)
        if budget.max_size_ratio is not None:
            limit = budget.max_size_ratio * size
        else:
            limit = budget.max_size_mb * 1e6
            if size > limit:
                raise StageError(
                    f"quantize.budget.max_size_mb: {budget.max_size_mb} MB is below the all-INT4 size "
                    f"{size / 1e6:.3f} MB"
                )
        for name in order:
            if size + extra[name] <= limit:
                chosen.append(name)
                size += extra[name]
        estimate = {"weight_mb": round(size / 1e6, 2), "limit_mb": round(limit / 1e6, 2)}
    else:
        chosen, estimate = _by_perplexity(model, plan, as8, sorted(candidates, key=sens.get, reverse=True), budget, ids)
    final = {**plan, **{n: as8[n] for n in chosen}}
    log(f"  budget: {len(chosen)} of {len(candidates)} layers raised to INT8 ({estimate})")
    return final, {"sensitivity_kl": sens, "int8_layers": chosen, "estimate": estimate}


def _packed(model, name: str, scheme: QuantScheme) -> int:
    w = model.get_submodule(name).weight.data
    return packed_bytes(quantize(w[:1], scheme)) * w.shape[0]


def _by_perplexity(model, plan, as8, order, budget: BudgetConfig, ids) -> tuple[list[str], dict]:
    base = _perplexity(model, ids, {})
    step = max(1, len(order) // 10)
    for count in range(0, len(order) + 1, step):
        trial = {**plan, **{n: as8[n] for n in order[:count]}}
        increase = (_perplexity(model, ids, trial) - base) / base * 100
        if increase <= budget.max_perplexity_increase_pct:
            return order[:count], {
                "perplexity_increase_pct": round(increase, 3),
                "calibration_perplexity": round(base, 3),
            }
    return order, {
        "perplexity_increase_pct": round(increase, 3),
        "calibration_perplexity": round(base, 3),
        "note": "budget not reached even with every candidate in INT8",
    }


def _perplexity(model, ids: torch.Tensor, plan: dict[str, QuantScheme]) -> float:
    originals = {n: model.get_submodule(n).weight.data for n in plan}
    try:
        for n, scheme in plan.items():
            model.get_submodule(n).weight.data = fake_quant(originals[n], scheme)
        with torch.no_grad():
            logits = model(ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return math.exp(float(nll))
    finally:
        for n, w in originals.items():
            model.get_submodule(n).weight.data = w


def bar_chart(sens: dict[str, float], int8: list[str], path: Path) -> None:
    """Per-layer sensitivity bars, INT8 choices highlighted, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sens)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.08), 4))
    ax.bar(range(len(names)), [sens[n] for n in names], color=["tab:red" if n in int8 else "tab:blue" for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("KL when only this layer is INT4")
    ax.set_xlabel("linear layers in model order (red: chosen for INT8)")
    ax.set_title("Per-layer quantization sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
