"""Quantize stage: hf-model -> hf-model whose linear weights are INT4/INT8 (RTN, GPTQ, AWQ) or prepared for W8A8.

The output is a normal HF checkpoint holding the *dequantized* weights (so PyTorch evaluation and
the exporter see exactly the quantized model's math) plus `quantized.safetensors` with the packed
MatMulNBits tensors of every quantized layer and `quant_plan.json` saying which layers got what.

Weight-only methods stream: RTN tensor by tensor (rtn.py), GPTQ and AWQ one decoder layer at a time
(layerwise.py), so memory follows a layer, not the model. Two passes still load the whole float32
model: the sensitivity budget's (every candidate layer is measured by the model's output) and W8A8's
SmoothQuant and static-scale calibration.
"""

from __future__ import annotations

import gc
import json
import time

import torch

from pipeline.configs import QuantizeConfig
from pipeline.errors import StageError
from pipeline.models import copy_tokenizer, load_torch_model, save_pretrained
from pipeline.quant.plan import PLAN_FILE, decoder_linears
from pipeline.quant.primitives import QuantScheme
from pipeline.quant.rotation import BLOCK, can_rotate
from pipeline.registry import StageResult, register_stage
from pipeline.stages.quantize.budget import bar_chart, choose
from pipeline.stages.quantize.layerwise import quantize_batches, quantize_layerwise
from pipeline.stages.quantize.output import skeleton
from pipeline.stages.quantize.plan import (
    embedding_scheme,
    embedding_shares_head,
    ignored,
    make_plan,
    scheme_dict,
)
from pipeline.stages.quantize.rtn import rtn_streamed
from pipeline.stages.quantize.w8a8 import ROTATED, smoothquant, static_input_scales


@register_stage("quantize", QuantizeConfig, consumes="hf-model", produces="hf-model")
def quantize_stage(cfg: QuantizeConfig, inp, ctx) -> StageResult:
    started = time.time()
    if cfg.method == "w8a8":
        return _w8a8(load_torch_model(inp.path, attention="sdpa"), cfg, inp.path, ctx, started)
    plan, skipped = make_plan(skeleton(inp.path), cfg)
    budget_info: dict = {}
    if cfg.budget is not None:
        plan, budget_info = _budget(cfg, inp.path, plan, ctx)
    layer_seconds: list[float] = []
    if cfg.method == "rtn":
        packed, float_bytes = rtn_streamed(cfg, inp.path, ctx.out_dir, plan, skipped, ctx.log)
    else:
        packed, float_bytes, layer_seconds = quantize_layerwise(cfg, inp.path, ctx.out_dir, plan, skipped, ctx.log)
    result = _result(plan, skipped, packed, float_bytes, budget_info, started)
    if layer_seconds:  # the calibrated methods' time per decoder layer (the capture of the inputs and the head apart)
        result.metrics["seconds_per_layer"] = round(sum(layer_seconds) / len(layer_seconds), 2)
        result.info["layer_seconds"] = layer_seconds
    return result


def _budget(cfg: QuantizeConfig, src, plan: dict[str, QuantScheme], ctx) -> tuple[dict[str, QuantScheme], dict]:
    """The plan with the most sensitive layers raised to INT8 (budget.py), measured on the whole float model,
    which is freed before the quantization streams."""
    model = load_torch_model(src, attention="sdpa")
    ids = torch.cat(quantize_batches(cfg, src, cfg.budget.sensitivity_length))[: cfg.budget.sensitivity_samples]
    embed = "shared" if embedding_shares_head(model, cfg) else embedding_scheme(model, cfg)
    plan, info = choose(model, plan, cfg.budget, ids, embed, ctx.log)
    bar_chart(info["sensitivity_kl"], info["int8_layers"], ctx.out_dir / "sensitivity.png")
    del model
    gc.collect()
    return plan, info


def _result(plan, skipped, packed: int, float_bytes: int, budget_info: dict, started: float) -> StageResult:
    return StageResult(
        metrics={
            "quantized_layers": len(plan),
            "float_layers": len(skipped),
            "quantized_weight_mb": round(packed / 1e6, 2),
            "float_weight_mb": round(float_bytes / 1e6, 2),
            "seconds": round(time.time() - started, 1),
        },
        info={"skipped_layers": skipped, "plan": {n: scheme_dict(s) for n, s in plan.items()}, **budget_info},
    )


def _w8a8(model, cfg: QuantizeConfig, src_dir, ctx, started: float) -> StageResult:
    """Float checkpoint (SmoothQuant-migrated if asked) + the plan telling export to quantize weights and activations."""
    if cfg.w8a8.hadamard:
        for name in (n for n in decoder_linears(model) if n.endswith(ROTATED)):
            if not can_rotate(width := model.get_submodule(name).in_features):
                raise StageError(
                    f"quantize.w8a8.hadamard: {name} takes {width} inputs, not a multiple of the {BLOCK}-wide "
                    "Hadamard block; set hadamard: false for this model"
                )
    batches = quantize_batches(cfg, src_dir)
    info: dict = {}
    if cfg.w8a8.smoothquant:
        how = "searched per layer" if cfg.w8a8.smoothquant == "auto" else str(cfg.w8a8.smoothquant)
        ctx.log(
            f"  SmoothQuant alpha {how} over {len(batches)} calibration batches, {cfg.search_tokens} tokens per input"
        )
        info["smoothquant"] = smoothquant(
            model,
            batches,
            cfg.w8a8.smoothquant,
            cfg.w8a8.activations,
            cfg.search_tokens,
            cfg.calibration.seed,
            ctx.log,
            cfg.w8a8.hadamard,
        )
    save_pretrained(model, ctx.out_dir)
    copy_tokenizer(src_dir, ctx.out_dir)
    linears = decoder_linears(model)
    skipped = {n: why for n in linears if (why := ignored(n, cfg)) is not None}
    if cfg.lm_head == "int8":
        linears.append("lm_head")  # int8 activations too: the float head is half a decode step's reads
    else:
        skipped["lm_head"] = "lm_head: float (recipe; int8 quantizes it to W8A8 too)"
    modules = [n for n in linears if n not in skipped]
    if not modules:
        raise StageError("quantize: the ignore list leaves no decoder layer to quantize")
    rotations = {n: BLOCK for n in modules if n.endswith(ROTATED)} if cfg.w8a8.hadamard else {}
    if rotations:
        ctx.log(
            f"  hadamard: {len(rotations)} down_proj inputs rotated at run time ({BLOCK}-wide blocks), weights to match"
        )
    input_scales = None
    if cfg.w8a8.activations == "static":
        ctx.log(
            f"  static: calibrating one int8 input scale per linear input (clip searched on {cfg.search_tokens} tokens)"
        )
        info["static_inputs"] = static_input_scales(
            model, batches, modules, cfg.search_tokens, cfg.calibration.seed, ctx.log, cfg.w8a8.hadamard
        )
        input_scales = {name: found["scale"] for name, found in info["static_inputs"].items()}
    plan = {
        "method": "w8a8",
        "activations": cfg.w8a8.activations,
        "smoothquant": cfg.w8a8.smoothquant,
        "layers": {},
        "w8a8_modules": modules,
        "skipped": skipped,
        "input_scales": input_scales,
        "rotations": rotations,
    }
    (ctx.out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    ctx.log(
        f"  W8A8 {cfg.w8a8.activations}: int8 weights (per channel) and activations for {len(modules)} linears, applied to "
        f"the graph at export; {len(skipped)} kept float"
    )
    return StageResult(metrics={"seconds": round(time.time() - started, 1)}, info={"w8a8": plan, **info})
