"""Per-family data for export: which decoder families we export, and their parity tolerance.

Adding a family whose HF implementation takes a 4D additive mask, `position_ids` and a
`DynamicCache` is one line here plus a tiny-model parity test.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import StageError, did_you_mean


@dataclass(frozen=True)
class ArchSpec:
    # export-time max |logits_onnx - logits_torch| on the parity check; logits are O(10), float32 kernels
    # (MatMulNBits, fused attention) differ in accumulation order by ~1e-4, a wrong graph by >0.1
    atol: float = 1e-3


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(),
}


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def arch_for(config) -> ArchSpec:
    model_type = getattr(config, "model_type", "?")
    if model_type not in ARCHS:
        raise StageError(
            f"model family '{model_type}' is not supported for export{did_you_mean(model_type, ARCHS)}; "
            f"supported: {', '.join(ARCHS)}"
        )
    return ARCHS[model_type]


def model_dims(config) -> ModelDims:
    heads = config.num_attention_heads
    return ModelDims(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
    )
