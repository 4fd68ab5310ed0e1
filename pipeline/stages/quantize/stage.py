"""Quantize stage: hf-model -> hf-model whose linear weights are INT4/INT8 (RTN, GPTQ, AWQ) or prepared for W8A8.

The output is a normal HF checkpoint holding the *dequantized* weights (so PyTorch evaluation and
the exporter see exactly the quantized model's math) plus `quantized.safetensors` with the packed
MatMulNBits tensors of every quantized layer and `quant_plan.json` saying which layers got what.

GPTQ calibrates layer by layer (see calibration.collect): memory is bounded by one layer's
activations for the calibration set, never the whole model's.
"""
from __future__ import annotations

import json
import time

import torch
from safetensors.numpy import save_file
from tqdm import tqdm

from calibration import DataError
from calibration.batches import calibration_batches
from calibration.collect import calibration_estimate, capture_layer_inputs, decoder_layers, feed_inputs, run_layer
from pipeline.configs import QuantizeConfig
from pipeline.errors import StageError
from pipeline.models import copy_tokenizer, load_torch_model
from pipeline.quant.gptq import HessianAccumulator, gptq_refit
from pipeline.stages.quantize.awq import awq_model
from pipeline.stages.quantize.rtn import rtn_streamed
from pipeline.stages.quantize.plan import (
    EMBEDDING, LM_HEAD_BITS, embedding_scheme, embedding_shares_head, ignored, make_plan, plan_file, plan_summary,
    scheme_dict,
)
from pipeline.stages.quantize.budget import bar_chart, choose
from pipeline.stages.quantize.w8a8 import ROTATED, smoothquant, static_input_scales
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE, decoder_linears
from pipeline.quant.primitives import QTensor, QuantScheme, dequantize, pack_matmul_nbits, quantize
from pipeline.quant.rotation import BLOCK, can_rotate
from pipeline.registry import StageResult, register_stage



@register_stage("quantize", QuantizeConfig, consumes="hf-model", produces="hf-model")
def quantize_stage(cfg: QuantizeConfig, inp, ctx) -> StageResult:
    started = time.time()
    if cfg.method == "rtn" and cfg.budget is None:  # no forward pass needed: never the whole model in memory
        plan, skipped, packed, float_bytes = rtn_streamed(cfg, inp.path, ctx.out_dir, ctx.log)
        return _result(plan, skipped, packed, float_bytes, {}, started)
    model = load_torch_model(inp.path, attention="sdpa")  # calibration passes only; export traces its own copy
    if cfg.method == "w8a8":
        return _w8a8(model, cfg, inp.path, ctx, started)
    return _result(*quantize_loaded(model, cfg, inp.path, ctx), started)


def quantize_loaded(model, cfg: QuantizeConfig, src_dir, ctx) -> tuple[dict, dict, int, int, dict]:
    """Weight-only quantization of the whole model in memory (RTN with a budget, GPTQ, AWQ) into ctx.out_dir;
    returns (plan, skipped layers, packed bytes, the planned layers' float32 bytes, the budget's record)."""
    plan, skipped = make_plan(model, cfg)
    share = embedding_shares_head(model, cfg)
    budget_info = {}
    if cfg.budget is not None:
        ids = torch.cat(_calibration_batches(cfg, src_dir, cfg.budget.sensitivity_length))[: cfg.budget.sensitivity_samples]
        embed = "shared" if share else None if cfg.embedding == "float" else \
            QuantScheme(LM_HEAD_BITS[cfg.embedding], cfg.group_size, cfg.symmetric)
        plan, budget_info = choose(model, plan, cfg.budget, ids, embed, ctx.log)
        bar_chart(budget_info["sensitivity_kl"], budget_info["int8_layers"], ctx.out_dir / "sensitivity.png")
    if "lm_head" in plan and model.config.tie_word_embeddings and not share:
        _untie_lm_head(model)  # the embedding keeps its own (float or separately quantized) copy
    ctx.log(f"  {cfg.method.upper()} {len(plan)} layers ({plan_summary(plan)}), {len(skipped)} kept float")
    if cfg.method == "rtn":
        qtensors = {name: quantize(model.get_submodule(name).weight.data, scheme)
                    for name, scheme in tqdm(plan.items(), desc="  rtn", leave=False)}
    elif cfg.method == "gptq":
        qtensors = _gptq_model(model, plan, cfg, src_dir, ctx)
    else:
        qtensors = awq_model(model, plan, cfg, _calibration_batches(cfg, src_dir), ctx.log)
    embed = _quantize_embedding(model, cfg, qtensors, share, skipped)
    for name, qt in qtensors.items():
        model.get_submodule(name).weight.data = dequantize(qt).to(model.dtype)
    packed = _save(model, qtensors, plan, skipped, cfg, src_dir, ctx.out_dir, embed)
    float_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in plan)
    return plan, skipped, packed, float_bytes, budget_info


def _result(plan, skipped, packed: int, float_bytes: int, budget_info: dict, started: float) -> StageResult:
    return StageResult(
        metrics={"quantized_layers": len(plan), "float_layers": len(skipped),
                 "quantized_weight_mb": round(packed / 1e6, 2), "float_weight_mb": round(float_bytes / 1e6, 2),
                 "seconds": round(time.time() - started, 1)},
        info={"skipped_layers": skipped, "plan": {n: scheme_dict(s) for n, s in plan.items()}, **budget_info},
    )


def _w8a8(model, cfg: QuantizeConfig, src_dir, ctx, started: float) -> StageResult:
    """Float checkpoint (SmoothQuant-migrated if asked) + the plan telling export to quantize weights and activations."""
    if cfg.hadamard:
        for name in (n for n in decoder_linears(model) if n.endswith(ROTATED)):
            if not can_rotate(width := model.get_submodule(name).in_features):
                raise StageError(f"quantize.hadamard: {name} takes {width} inputs, not a multiple of the {BLOCK}-wide "
                                 "Hadamard block; set hadamard: false for this model")
    batches = _calibration_batches(cfg, src_dir)
    info: dict = {}
    if cfg.smoothquant:
        how = "searched per layer" if cfg.smoothquant == "auto" else str(cfg.smoothquant)
        ctx.log(f"  SmoothQuant alpha {how} over {len(batches)} calibration batches, {cfg.search_tokens} tokens per input")
        info["smoothquant"] = smoothquant(model, batches, cfg.smoothquant, cfg.activations, cfg.search_tokens,
                                          cfg.calibration.seed, ctx.log, cfg.hadamard)
    model.save_pretrained(ctx.out_dir, safe_serialization=True)
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
    rotations = {n: BLOCK for n in modules if n.endswith(ROTATED)} if cfg.hadamard else {}
    if rotations:
        ctx.log(f"  hadamard: {len(rotations)} down_proj inputs rotated at run time ({BLOCK}-wide blocks), weights to match")
    input_scales = None
    if cfg.activations == "static":
        ctx.log(f"  static: calibrating one int8 input scale per linear input (clip searched on {cfg.search_tokens} tokens)")
        info["static_inputs"] = static_input_scales(model, batches, modules, cfg.search_tokens, cfg.calibration.seed, ctx.log,
                                                       cfg.hadamard)
        input_scales = {name: found["scale"] for name, found in info["static_inputs"].items()}
    plan = {"method": "w8a8", "activations": cfg.activations, "smoothquant": cfg.smoothquant, "layers": {},
            "w8a8_modules": modules, "skipped": skipped, "input_scales": input_scales, "rotations": rotations}
    (ctx.out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    ctx.log(f"  W8A8 {cfg.activations}: int8 weights (per channel) and activations for {len(modules)} linears, applied to "
            f"the graph at export; {len(skipped)} kept float")
    return StageResult(metrics={"seconds": round(time.time() - started, 1)}, info={"w8a8": plan, **info})


def _quantize_embedding(model, cfg: QuantizeConfig, qtensors: dict, share: bool, skipped: dict) -> dict | None:
    """Embedding rows for GatherBlockQuantized: round-to-nearest along the hidden axis (no activations to calibrate)."""
    scheme = embedding_scheme(model, cfg)
    if scheme is None:
        skipped[EMBEDDING] = "embedding: float (recipe)"
        return None
    if share:
        return {"shared_with": "lm_head"}
    qtensors[EMBEDDING] = quantize(model.get_submodule(EMBEDDING).weight.data, scheme)
    return {"shared_with": None}


def _gptq_model(model, plan, cfg: QuantizeConfig, model_dir, ctx) -> dict[str, QTensor]:
    batches = _calibration_batches(cfg, model_dir)
    hidden, kwargs = capture_layer_inputs(model, batches)
    layers = decoder_layers(model)
    ctx.log("  " + calibration_estimate(layers, hidden, kwargs))
    qtensors: dict[str, QTensor] = {}
    for index, layer in enumerate(tqdm(layers, desc="  gptq layers", unit="layer")):
        names = {n: model.get_submodule(n) for n in plan if n.startswith(f"model.layers.{index}.")}
        hessians = _collect_hessians(layer, names, hidden, kwargs, index)
        for name, module in names.items():
            qtensors[name] = gptq_refit(module.weight.data, hessians[name].H, plan[name], cfg)
            module.weight.data = dequantize(qtensors[name])
        hidden = run_layer(layer, hidden, kwargs)  # what the next layer sees: this layer, quantized
    if "lm_head" in plan:
        acc = HessianAccumulator(model.lm_head.in_features)
        with torch.no_grad():
            for h in hidden:
                acc.add(model.model.norm(h))
        qtensors["lm_head"] = gptq_refit(model.lm_head.weight.data, acc.H, plan["lm_head"], cfg)
    return qtensors


def _collect_hessians(layer, modules, hidden, kwargs, index) -> dict[str, HessianAccumulator]:
    """H of each linear's inputs; layers fed the same tensor (q/k/v, gate/up) share one accumulator."""
    acc: dict[str, HessianAccumulator] = {}
    batch_inputs: dict[tuple, tuple[torch.Tensor, HessianAccumulator]] = {}  # holds tensors alive: no address reuse

    def sink(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        if key not in batch_inputs:
            target = acc.get(name) or HessianAccumulator(x.shape[-1])
            try:
                target.add(x)
            except FloatingPointError as e:
                raise StageError(f"quantize: NaN/Inf in the inputs of {name} (layer {index}); the model or data is broken") from e
            batch_inputs[key] = (x, target)
        acc.setdefault(name, batch_inputs[key][1])
        assert acc[name] is batch_inputs[key][1], f"{name}: input sharing changed between batches"

    for h, kw in zip(hidden, kwargs):
        feed_inputs(layer, h, kw, modules, sink)
        batch_inputs.clear()
    return acc


def _calibration_batches(cfg: QuantizeConfig, model_dir, length: int | None = None) -> list[torch.Tensor]:
    try:
        return calibration_batches(cfg.calibration, model_dir, "quantize.calibration", length)
    except DataError as e:
        raise StageError(str(e)) from e


def _untie_lm_head(model) -> None:
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _save(model, qtensors, plan, skipped, cfg, src_dir, out, embed: dict | None) -> int:
    """Write the checkpoint, the packed tensors and the plan; returns the packed bytes."""
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(src_dir, out)
    tensors = {}
    for name, qt in qtensors.items():
        for key, array in pack_matmul_nbits(qt).items():
            tensors[f"{name}.{key}"] = array
    save_file(tensors, str(out / PACKED_FILE))
    shapes = {n: (qt.scheme, qt.shape[0], qt.shape[1]) for n, qt in qtensors.items()}
    (out / PLAN_FILE).write_text(plan_file(cfg.method, shapes, embed, skipped))
    return sum(a.nbytes for a in tensors.values())
