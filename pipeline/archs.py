"""Per-family data: which decoder families we export, and what each computes beyond Llama's decoder.

A family is a few fields here that the graph builders (pipeline/graph/fused.py) read; the portable
graph is traced from the family's own transformers code, so it needs nothing. Adding a family whose HF
implementation takes a 4D additive mask, `position_ids` and a `DynamicCache` and whose differences are
among these fields is one entry plus its tiny-model parity tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import StageError, did_you_mean


@dataclass(frozen=True)
class ArchSpec:
    # export-time max |logits_onnx - logits_torch| on the parity check; logits are O(10), float32 kernels
    # (MatMulNBits, fused attention) differ in accumulation order by ~1e-4, a wrong graph by >0.1
    atol: float = 1e-3
    # pre: each block reads norm(residual) and adds its output (Llama); post: each block reads the residual and
    # adds norm(its output) (OLMo 2: post_attention_layernorm and post_feedforward_layernorm, no input norm);
    # both: each block reads norm(residual) and adds norm(its output) (Gemma 2 and 3: four norms per layer)
    norms: Literal["pre", "post", "both"] = "pre"
    # RMSNorms multiply by (offset + weight): Gemma stores its norm weights around 0 and adds 1
    norm_offset: float = 0.0
    # RMSNorm on q and k before rotary: per head (Qwen3) or across all heads at once (OLMo 2)
    qk_norm: Literal["none", "head", "full"] = "none"
    # config attributes that scale what Llama leaves unscaled (Granite); unset: 1
    embedding_multiplier: str | None = None  # the embeddings are multiplied by it
    attention_multiplier: str | None = None  # the attention scores' scale, instead of 1/sqrt(head_dim)
    residual_multiplier: str | None = None  # each block's output is multiplied by it before the residual add
    logits_divisor: str | None = None  # the logits are divided by it
    # config attribute listing, per layer, 1 where it applies rotary embeddings and 0 where not (SmolLM3)
    rope_layers: str | None = None
    # the embeddings are multiplied by sqrt(hidden_size) (Gemma)
    embedding_sqrt_scale: bool = False
    # config attribute whose inverse square root scales the attention scores (Gemma's query_pre_attn_scalar)
    attention_scalar: str | None = None
    # config attributes capping attention scores and logits at ±c through c·tanh(x/c) (Gemma 2); unset or null: none
    attention_softcap: str | None = None
    logits_softcap: str | None = None
    # q, k and v in one linear (self_attn.qkv_proj) and gate and up in one (mlp.gate_up_proj), as Phi-3 stores them
    packed: bool = False


GRANITE = ArchSpec(
    embedding_multiplier="embedding_multiplier",
    attention_multiplier="attention_multiplier",
    residual_multiplier="residual_multiplier",
    logits_divisor="logits_scaling",
)

GEMMA = ArchSpec(norm_offset=1.0, embedding_sqrt_scale=True)
# Gemma 2 and 3 add norms on each block's output, scale the scores by query_pre_attn_scalar, alternate sliding-window
# and full layers (`layer_types`); Gemma 3 normalizes q and k per head and gives its sliding layers a rotary base
# of their own, read from its rotary module
GEMMA2 = dataclasses.replace(
    GEMMA,
    norms="both",
    attention_scalar="query_pre_attn_scalar",
    attention_softcap="attn_logit_softcapping",
    logits_softcap="final_logit_softcapping",
)

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(qk_norm="head"),
    "granite": GRANITE,
    "olmo2": ArchSpec(norms="post", qk_norm="full"),
    "smollm3": ArchSpec(rope_layers="no_rope_layers"),
    "phi3": ArchSpec(packed=True),
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": dataclasses.replace(GEMMA2, qk_norm="head"),
}


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def arch_for(config) -> ArchSpec:
    """The family's spec; `config` is a transformers config or its config.json as a dict."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise StageError(
            f"model family '{model_type}' is not supported for export{did_you_mean(str(model_type), ARCHS)}; "
            f"supported: {', '.join(ARCHS)}"
        )
    return ARCHS[model_type]


def export_spec(config) -> ArchSpec:
    """The family's spec, or the one line that says why this model cannot be exported here."""
    import transformers

    spec = arch_for(config)
    if longrope_switch(config) and int(transformers.__version__.split(".")[0]) < 5:
        raise StageError(
            f"export: {config.model_type} uses longrope, and transformers {transformers.__version__}'s generate "
            "recomputes every cached key with the long factors once a sequence passes the original length, which "
            "a KV-cache graph does not (keys keep the factors they were cached with, as on transformers 5): "
            "validation against it would disagree past that length; use transformers 5"
        )
    return spec


def multiplier(config, spec: ArchSpec, field: str) -> float | None:
    """The config's value for one of the spec's multiplier fields; None where the family has none or it is 1."""
    attribute = getattr(spec, field)
    value = getattr(config, attribute, None) if attribute else None
    return None if value is None or float(value) == 1.0 else float(value)


def softcap(config, spec: ArchSpec, field: str) -> float | None:
    """The cap of one of the spec's soft-capping fields; None where the family or this config has none."""
    attribute = getattr(spec, field)
    value = getattr(config, attribute, None) if attribute else None
    return float(value) if value else None


def attention_scale(config, spec: ArchSpec, head_dim: int) -> float:
    """What the attention scores are multiplied by before the softmax."""
    if spec.attention_multiplier:
        return float(getattr(config, spec.attention_multiplier))
    if spec.attention_scalar:
        return float(getattr(config, spec.attention_scalar)) ** -0.5
    return head_dim**-0.5


def layer_kinds(config) -> list[str]:
    """Per layer "sliding_attention" (attends to the last `sliding_window` positions) or "full_attention"."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if not window:
        return ["full_attention"] * config.num_hidden_layers
    if kinds:
        return list(kinds)
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return ["full_attention"] * config.num_hidden_layers
    return ["sliding_attention"] * config.num_hidden_layers


def longrope_switch(cfg) -> int | None:
    """The sequence length past which longrope (Phi-3.5, Phi-4-mini) rotates by its long factors; None without it."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) != "longrope":
        return None
    length = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
    return int(length or cfg.max_position_embeddings)


def uses_rotary(config, spec: ArchSpec, layer: int) -> bool:
    return not spec.rope_layers or bool(getattr(config, spec.rope_layers)[layer])


def model_dims(config) -> ModelDims:
    heads = config.num_attention_heads
    return ModelDims(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
    )
