"""GPTQ and AWQ one decoder layer at a time, from the model step's checkpoint to the artifact.

Calibration needs activations, so unlike RTN it runs the model; but each decoder layer only needs
the outputs of the one before it. The model is its own transformers class with the decoder layers
on the meta device (pipeline.streamed): embeddings, final norm and head are resident, and

    calibration ids ─► embeddings ─► hidden ─┬─► read layer i (float32) ─► calibrate, quantize (gptq.py / awq.py)
                                             │   ─► run it quantized: hidden for layer i + 1
                                             │   ─► write its tensors and codes, drop it
                                             └─► … then the head on the final norm of the last hidden states

Peak memory is the embeddings and head, one layer in float32 with its Hessians, and the calibration
activations twice ([samples, sequence, hidden] in float32); never the whole model. An 8B model's
layer is 0.9 GB in float32, its activations for 128 × 512 tokens 1 GB.

The artifact is the one quantizing the loaded model would write (tests/pipeline/stages/
test_quantize_streamed.py holds the two side by side).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from calibration import DataError
from calibration.batches import calibration_batches
from calibration.collect import calibration_estimate, capture_layer_inputs, decoder_layers, run_layer
from pipeline.checkpoint import ShardedWriter
from pipeline.configs import QuantizeConfig
from pipeline.errors import StageError
from pipeline.quant.primitives import QTensor, QuantScheme, dequantize, quantize
from pipeline.stages.quantize.awq import awq_head, awq_layer
from pipeline.stages.quantize.gptq import gptq_head, gptq_layer
from pipeline.stages.quantize.output import HEAD, HeadLayout, PackedCodes, finish, head_layout
from pipeline.stages.quantize.plan import EMBEDDING, plan_summary
from pipeline.streamed import load_layer, load_streamed_model, unload_layer

# layer forwards per calibration batch that each method's work costs (measured on SmolLM2), for the estimate
PASSES = {"gptq": 2.6, "awq": 2.6, "awq+gptq": 4.5}


def quantize_layerwise(
    cfg: QuantizeConfig,
    src: Path,
    out: Path,
    plan: dict[str, QuantScheme],
    skipped: dict[str, str],
    log: Callable[[str], None],
) -> tuple[int, int, list[float]]:
    """GPTQ or AWQ of the checkpoint in `src` into `out` as `plan` says; returns (packed bytes, the planned layers'
    float32 bytes, each decoder layer's seconds). Adds the embedding to `skipped` when it stays float."""
    model = load_streamed_model(src, attention="sdpa", on_demand=False)
    layout = head_layout(model, cfg, plan, skipped)
    batches = quantize_batches(cfg, src)
    hidden, kwargs = capture_layer_inputs(model, batches)
    layers = decoder_layers(model)
    method = "awq+gptq" if cfg.method == "awq" and cfg.awq.codes == "gptq" else cfg.method
    log(
        f"  {cfg.method.upper()} {len(plan)} layers ({plan_summary(plan)}), {len(skipped)} kept float; one decoder "
        f"layer at a time from {src.name}"
    )
    log(
        "  "
        + calibration_estimate(load_layer(model, 0), len(layers), hidden, kwargs, PASSES[method])
        + (f"; searches on {cfg.search_tokens} tokens per input" if cfg.method == "awq" else "")
        + ("; codes by GPTQ" if method == "awq+gptq" else "")
    )
    gen = torch.Generator().manual_seed(cfg.calibration.seed)  # AWQ's token samples, drawn in layer order
    with ShardedWriter(out) as weights, PackedCodes(out) as codes:
        seconds = []
        for index in tqdm(range(len(layers)), desc=f"  {cfg.method} layers", unit="layer"):
            started = time.perf_counter()
            prefix = f"model.layers.{index}."
            layer = load_layer(model, index)
            if cfg.method == "gptq":
                qtensors = gptq_layer(layer, prefix, plan, cfg, hidden, kwargs)
            else:
                qtensors = awq_layer(layer, prefix, index, plan, cfg, hidden, kwargs, gen)
            for name, qt in qtensors.items():
                layer.get_submodule(name[len(prefix) :]).weight.data = dequantize(qt)
                codes.add(name, qt)
            hidden = run_layer(layer, hidden, kwargs)  # what the next layer sees: this layer, quantized
            for name, tensor in layer.state_dict().items():
                weights.add(prefix + name, tensor)
            unload_layer(model, index)
            seconds.append(round(time.perf_counter() - started, 2))
        head = _head_codes(model, plan, cfg, hidden, gen)
        _write_outside_layers(model, weights, codes, head, layout)
    finish(out, src, model.config, cfg.method, plan, skipped, codes, layout)
    return codes.bytes, sum(model.get_submodule(n).weight.numel() * 4 for n in plan), seconds


def _head_codes(
    model, plan: dict[str, QuantScheme], cfg: QuantizeConfig, hidden: list[torch.Tensor], gen: torch.Generator
) -> QTensor | None:
    if HEAD not in plan:
        return None
    weight = model.get_submodule(HEAD).weight.data
    if cfg.method == "gptq":
        return gptq_head(model.model.norm, weight, plan[HEAD], cfg, hidden)
    return awq_head(model.model.norm, weight, plan[HEAD], cfg, hidden, gen)


def _write_outside_layers(
    model, weights: ShardedWriter, codes: PackedCodes, head: QTensor | None, layout: HeadLayout
) -> None:
    """Embedding, final norm and head. A shared embedding holds the head's dequantized codes; an embedding of
    its own is rounded to nearest (its rows are looked up, no activations to calibrate on)."""
    if head is not None:
        codes.add(HEAD, head)
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers.") or (layout.tied and name == f"{HEAD}.weight"):
            continue
        if name == f"{HEAD}.weight" and head is not None:
            tensor = dequantize(head)
        elif name == f"{EMBEDDING}.weight":
            if layout.share and head is not None:
                tensor = dequantize(head)
            elif layout.embed_scheme is not None:
                qt = quantize(tensor, layout.embed_scheme)
                codes.add(EMBEDDING, qt)
                tensor = dequantize(qt)
        weights.add(name, tensor.float())


def quantize_batches(cfg: QuantizeConfig, src: Path, length: int | None = None) -> list[torch.Tensor]:
    """The quantize step's calibration blocks; a text that cannot give them stops the stage in one line."""
    try:
        return calibration_batches(cfg.calibration, src, "quantize.calibration", length)
    except DataError as e:
        raise StageError(str(e)) from e
