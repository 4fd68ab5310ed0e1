"""An int8 KV cache: static per-channel scales calibrated on text, and the PyTorch model of its rounding.

ONNX Runtime's GroupQueryAttention (CPU) can keep past/present in int8: it stores
round(x / scale) saturated to [-128, 127] for each new key (after the rotary embedding) and value,
and attends over the dequantized cache, in the prompt as well as in decode steps. The scales are
inputs of the node, fixed at export, one per (KV head, channel) as [1, kv_heads, 1, head_dim].

`kv_scales` takes them from calibration text: max |x| of each channel over the keys and values the
model caches, / 127. Per channel, not per tensor, because a few rotary channels of K carry most of
its range (SmolLM2-135M: +0.02 % WikiText-2 perplexity per channel, +0.33 % per tensor, measured by
benchmarks/experiments/kv_int8_probe.py). `RoundingCache` is a transformers cache that rounds the same way, so
the export's parity check compares the int8 graph with PyTorch doing what the kernel does.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

QMAX = 127  # scales map the calibrated peak to ±127; the kernel saturates at -128 and 127 (int8's range)


@torch.no_grad()
def kv_scales(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (key scale, value scale), each float32 [1, kv_heads, 1, head_dim], from the caches the
    model fills on `batches` of token ids."""
    peaks: list[list[torch.Tensor]] = []
    for ids in batches:
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            k, v = (t.abs().amax(dim=(0, 2), keepdim=True) for t in (layer.keys, layer.values))  # [1, KV, 1, D]
            if i == len(peaks):
                peaks.append([k, v])
            else:
                peaks[i] = [torch.maximum(peaks[i][0], k), torch.maximum(peaks[i][1], v)]
    # a channel that never moved gets a tiny scale instead of zero (the kernel divides by it)
    return [tuple((p.clamp(min=1e-6) / QMAX).float().numpy() for p in pair) for pair in peaks]


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, KV, T, D] rounded to the int8 grid of `scale` [1, KV, 1, D] and back."""
    return (x / scale).round().clamp(-QMAX - 1, QMAX) * scale


class RoundingCache(DynamicCache):
    """A DynamicCache that stores (and so attends over) keys and values rounded to int8 with fixed scales.
    `float_prompt`: the first call (the prompt) attends over its own unrounded keys and values and stores
    them rounded, as the runner's float prefill does (runtime.float_prefill)."""

    def __init__(self, scales: list[tuple[np.ndarray, np.ndarray]], float_prompt: bool = False):
        super().__init__()
        self.scales = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in scales]
        self.float_prompt = float_prompt

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k_scale, v_scale = self.scales[layer_idx]
        first = self.get_seq_length(layer_idx) == 0
        out = super().update(
            fake_quantize(key_states, k_scale), fake_quantize(value_states, v_scale), layer_idx, *args, **kwargs
        )
        return (key_states, value_states) if self.float_prompt and first else out
