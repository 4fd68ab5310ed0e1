"""RTN tensor by tensor: the quantize step without the model in memory.

Round-to-nearest needs no activations, so nothing needs a forward pass: each tensor is read from the
model step's shards, upcast to float32 as loading the model would, quantized if the plan names its
layer, dequantized, and written straight into the output checkpoint; its packed codes go to
`quantized.safetensors` the same way. Memory is one tensor (plus the writers' headers), whatever the
model's size: an 8B model's largest tensor is under 1 GB in float32.

The artifact is the one the whole-model path writes (`stage.py`): the same codes, the same float32
checkpoint tensors, the same plan (tests/pipeline/stages/test_quantize_rtn.py checks them against
each other on a tiny model and on the reference model).

    model step shards ──► tensor ──► [planned: quantize ─► pack ──► quantized.safetensors]
                                      └─ dequantize (or as is) ─► float32 ──► model.safetensors
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from pipeline.checkpoint import CheckpointReader, SafetensorsWriter, ShardedWriter
from pipeline.configs import QuantizeConfig
from pipeline.models import copy_tokenizer
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE
from pipeline.quant.primitives import QuantScheme, dequantize, pack_matmul_nbits, quantize
from pipeline.stages.quantize.plan import (
    EMBEDDING, embedding_scheme, embedding_shares_head, make_plan, plan_file, plan_summary,
)

HEAD = "lm_head"


def skeleton(folder: Path):
    """The model of `folder` on the meta device: module names, types and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def rtn_streamed(cfg: QuantizeConfig, src: Path, out: Path, log: Callable[[str], None]) -> tuple[dict, dict, int, int]:
    """Quantize the checkpoint in `src` into `out` tensor by tensor; returns (plan, skipped layers, packed bytes,
    the planned layers' float32 bytes)."""
    model = skeleton(src)
    config = model.config
    plan, skipped = make_plan(model, cfg)
    share = embedding_shares_head(model, cfg)
    embed_scheme = embedding_scheme(model, cfg)
    if embed_scheme is None:
        skipped[EMBEDDING] = "embedding: float (recipe)"
    untie = HEAD in plan and config.tie_word_embeddings and not share  # the head gets codes of its own
    tied = config.tie_word_embeddings and not untie
    log(f"  RTN {len(plan)} layers ({plan_summary(plan)}), {len(skipped)} kept float; tensor by tensor from "
        f"{src.name}")
    reader = CheckpointReader(src)
    names = [n for n in model.state_dict() if not (tied and n == f"{HEAD}.weight")]
    shapes: dict[str, tuple[QuantScheme, int, int]] = {}
    packed_bytes = 0
    with ShardedWriter(out) as weights, SafetensorsWriter(out / PACKED_FILE) as packed:
        for name in tqdm(names, desc="  rtn", unit="tensor", leave=False):
            module, _, kind = name.rpartition(".")
            stored = name if name in reader else f"{EMBEDDING}.weight"  # an untied head starts as the embedding
            tensor = reader[stored].float()
            scheme = _scheme_for(module, kind, plan, share, embed_scheme)
            if scheme is not None:
                qt = quantize(tensor, scheme)
                key = HEAD if module == EMBEDDING and share else module  # a shared embedding holds the head's codes
                shapes[key] = (scheme, qt.shape[0], qt.shape[1])
                for part, array in pack_matmul_nbits(qt).items():
                    packed.add(f"{key}.{part}", array)
                    packed_bytes += array.nbytes
                tensor = dequantize(qt).float()
            weights.add(name, tensor)
    order = [n for n in (*plan, EMBEDDING) if n in shapes]  # the whole-model path's order: plan, then the embedding
    embed = None if embed_scheme is None else {"shared_with": HEAD if share else None}
    (out / PLAN_FILE).write_text(plan_file(cfg.method, {n: shapes[n] for n in order}, embed, skipped))
    float_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in plan)
    config.tie_word_embeddings = tied
    config.dtype = torch.float32
    config.save_pretrained(out)
    copy_tokenizer(src, out)
    return plan, skipped, packed_bytes, float_bytes


def _scheme_for(module: str, kind: str, plan: dict[str, QuantScheme], share: bool,
                embed_scheme: QuantScheme | None) -> QuantScheme | None:
    """The scheme a checkpoint tensor is quantized with, or None when it stays as it is."""
    if kind != "weight":
        return None
    if module == EMBEDDING:
        return plan[HEAD] if share else embed_scheme
    return plan.get(module)
