"""GPTQ over one decoder layer (the math is in pipeline.quant.gptq; layerwise.py walks the layers).

Each linear's Hessian comes from its inputs over every calibration batch; linears that read the same
tensor (q/k/v, gate/up) share one accumulator. The caller runs the quantized layer afterwards, so
the next layer calibrates on what the quantized model computes.
"""

from __future__ import annotations

import torch

from calibration.collect import feed_inputs
from pipeline.configs import QuantizeConfig
from pipeline.errors import StageError
from pipeline.quant.gptq import HessianAccumulator, gptq_refit
from pipeline.quant.primitives import QTensor, QuantScheme


def gptq_layer(
    layer: torch.nn.Module,
    prefix: str,
    plan: dict[str, QuantScheme],
    cfg: QuantizeConfig,
    hidden: list[torch.Tensor],
    kwargs: list[dict],
) -> dict[str, QTensor]:
    """The codes of the layer's planned linears (full names, `prefix` + the layer's own)."""
    modules = {n: layer.get_submodule(n[len(prefix) :]) for n in plan if n.startswith(prefix)}
    hessians = _collect_hessians(layer, modules, hidden, kwargs)
    return {name: gptq_refit(module.weight.data, hessians[name].H, plan[name], cfg) for name, module in modules.items()}


def gptq_head(
    norm: torch.nn.Module, weight: torch.Tensor, scheme: QuantScheme, cfg: QuantizeConfig, hidden: list[torch.Tensor]
) -> QTensor:
    """The LM head's codes, calibrated on the final norm of the last layer's outputs."""
    acc = HessianAccumulator(weight.shape[1])
    with torch.no_grad():
        for h in hidden:
            acc.add(norm(h))
    return gptq_refit(weight, acc.H, scheme, cfg)


def _collect_hessians(layer, modules: dict[str, torch.nn.Module], hidden, kwargs) -> dict[str, HessianAccumulator]:
    acc: dict[str, HessianAccumulator] = {}
    batch_inputs: dict[tuple, tuple[torch.Tensor, HessianAccumulator]] = {}  # holds tensors alive: no address reuse

    def sink(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        if key not in batch_inputs:
            target = acc.get(name) or HessianAccumulator(x.shape[-1])
            try:
                target.add(x)
            except FloatingPointError as e:
                raise StageError(f"quantize: NaN/Inf in the inputs of {name}; the model or data is broken") from e
            batch_inputs[key] = (x, target)
        acc.setdefault(name, batch_inputs[key][1])
        assert acc[name] is batch_inputs[key][1], f"{name}: input sharing changed between batches"

    for h, kw in zip(hidden, kwargs):
        feed_inputs(layer, h, kw, modules, sink)
        batch_inputs.clear()
    return acc
