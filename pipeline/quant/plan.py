"""What a quantize artifact holds besides its checkpoint, named once for every reader (export, formats, graph)."""

from __future__ import annotations

import torch

PLAN_FILE = "quant_plan.json"  # which layers got which scheme, and which stayed float (and why)
PACKED_FILE = "quantized.safetensors"  # the MatMulNBits codes, scales and zero points of every quantized layer


def decoder_linears(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers inside the decoder layers (the LM head is not one)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
