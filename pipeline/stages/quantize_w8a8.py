"""W8A8 preparation in PyTorch: optional SmoothQuant migration, and the calibration set for static ranges.

SmoothQuant (Xiao et al., 2022) moves activation outliers into the weights before both are
quantized to int8: per input channel, s = max|X|^α / max|W|^(1-α); the norm feeding the linears
is divided by s and the linears' weights multiplied by s (exact in float). The int8 quantization
itself is ONNX Runtime's (dynamic, or static QDQ) and happens at export, on the traced graph.
"""
from __future__ import annotations

import numpy as np
import torch

from calibration.collect import decoder_layers, input_hooks
from pipeline.stages.quantize_awq import fold_scale

# norm -> the linears it feeds (the Llama family); only norms can absorb 1/s without an extra op
SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


def smoothquant(model, batches: list[torch.Tensor], alpha: float) -> dict[str, float]:
    """Fold SmoothQuant scales into every decoder layer; returns the largest activation max per layer before."""
    first = {f"model.layers.{i}.{names[0]}": layer.get_submodule(names[0])
             for i, layer in enumerate(decoder_layers(model)) for _, names in SMOOTH_GROUPS}
    act_max: dict[str, torch.Tensor] = {}

    def sink(name: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
        act_max[name] = torch.maximum(act_max[name], m) if name in act_max else m

    with input_hooks(first, sink), torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    before = {}
    for i, layer in enumerate(decoder_layers(model)):
        for feeder, names in SMOOTH_GROUPS:
            mods = [layer.get_submodule(n) for n in names]
            x_max = act_max[f"model.layers.{i}.{names[0]}"].clamp(min=1e-5)
            w_max = torch.cat([m.weight.data for m in mods]).abs().amax(0).clamp(min=1e-5)
            s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
            fold_scale(layer.get_submodule(feeder), mods, s)
            before[f"model.layers.{i}.{feeder}"] = float(x_max.max())
    return before


def calibration_ids(batches: list[torch.Tensor]) -> np.ndarray:
    """The calibration token blocks, saved with the artifact so export can calibrate static ranges."""
    return torch.cat(batches).numpy().astype(np.int64)
