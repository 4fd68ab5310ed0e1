"""RTN tensor by tensor: the quantize step without the model in memory.

Round-to-nearest needs no activations, so nothing needs a forward pass: each tensor is read from the
model step's shards, upcast to float32 as loading the model would, quantized if the plan names its
layer, dequantized, and written straight into the output checkpoint; its packed codes go to
`quantized.safetensors` the same way. Memory is one tensor (plus the writers' headers), whatever the
model's size: an 8B model's largest tensor is under 1 GB in float32.

The artifact is the one quantizing the loaded model would write: the same codes, the same float32
checkpoint tensors, the same plan (tests/pipeline/stages/test_quantize_streamed.py checks them
against each other on tiny models and on the reference model).

    model step shards ──► tensor ──► [planned: quantize ─► pack ──► quantized.safetensors]
                                      └─ dequantize (or as is) ─► float32 ──► model.safetensors
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from pipeline.checkpoint import CheckpointReader, ShardedWriter
from pipeline.configs import QuantizeConfig
from pipeline.quant.primitives import QuantScheme, dequantize, quantize
from pipeline.stages.quantize.output import HEAD, HeadLayout, PackedCodes, finish, head_layout, skeleton
from pipeline.stages.quantize.plan import EMBEDDING, plan_summary


def rtn_streamed(
    cfg: QuantizeConfig,
    src: Path,
    out: Path,
    plan: dict[str, QuantScheme],
    skipped: dict[str, str],
    log: Callable[[str], None],
) -> tuple[int, int]:
    """Quantize the checkpoint in `src` into `out` tensor by tensor as `plan` says; returns (packed bytes, the
    planned layers' float32 bytes). Adds the embedding to `skipped` when it stays float."""
    model = skeleton(src)
    layout = head_layout(model, cfg, plan, skipped)
    log(f"  RTN {len(plan)} layers ({plan_summary(plan)}), {len(skipped)} kept float; tensor by tensor from {src.name}")
    reader = CheckpointReader(src)
    names = [n for n in model.state_dict() if not (layout.tied and n == f"{HEAD}.weight")]
    with ShardedWriter(out) as weights, PackedCodes(out) as codes:
        for name in tqdm(names, desc="  rtn", unit="tensor", leave=False):
            module, _, kind = name.rpartition(".")
            stored = name if name in reader else f"{EMBEDDING}.weight"  # an untied head starts as the embedding
            tensor = reader[stored].float()
            scheme = _scheme_for(module, kind, plan, layout)
            if scheme is not None:
                qt = quantize(tensor, scheme)
                codes.add(
                    HEAD if module == EMBEDDING and layout.share else module, qt
                )  # a shared embedding holds the head's codes
                tensor = dequantize(qt).float()
            weights.add(name, tensor)
    finish(out, src, model.config, cfg.method, plan, skipped, codes, layout)
    return codes.bytes, sum(model.get_submodule(n).weight.numel() * 4 for n in plan)


def _scheme_for(module: str, kind: str, plan: dict[str, QuantScheme], layout: HeadLayout) -> QuantScheme | None:
    """The scheme a checkpoint tensor is quantized with, or None when it stays as it is."""
    if kind != "weight":
        return None
    if module == EMBEDDING:
        return plan[HEAD] if layout.share else layout.embed_scheme
    return plan.get(module)
