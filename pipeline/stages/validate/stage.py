"""Validate stage: the exported artifact against the unoptimized PyTorch model.

    eval text ─► tokens ─► windows ─┬─► baseline PyTorch logits ─┐
                                    └─► ONNX logits ─────────────┴─► perplexity, Δ%, top-1 agreement, KL, max |Δ|
    prompt set ─► greedy (baseline PyTorch) vs greedy (runner, KV cache; batched and one by one)
              ─► decode-step logits (runner KV cache) vs. the export's own source model, full recompute

The baseline is the unoptimized model (accuracy); the export's source is the model the graph was
traced from (parity). They differ when a quantize stage stands between them; then the source is
loaded only after the baseline's work is done and the baseline freed, so one model is in memory.
A model whose float32 weights pass `pipeline.streamed.WHOLE_MODEL_LIMIT` is streamed layer by layer.

Every gate in `thresholds` is checked; all failures are reported together, the artifact (with
report.json and report.md) is kept either way, and a failure makes the run exit non-zero.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from calibration import DataError, load_text, text_fingerprint, windows
from pipeline.configs import DOMAIN_METRICS, VALIDATE_METRICS, ValidateConfig
from pipeline.errors import StageError
from pipeline.models import torch_greedy
from pipeline.quant.primitives import QuantScheme, count_schemes
from pipeline.registry import StageResult, register_stage
from pipeline.resources import release_memory
from pipeline.stages.validate.baseline import FOLDER, BaselineMemo, greedy_inputs
from pipeline.stages.validate.chat import chat_checks
from pipeline.stages.validate.gates import gates_for
from pipeline.stages.validate.report import write_reports
from pipeline.stages.validate.targets import ScoredWindow, agreement, scored_window, validate_targets
from pipeline.streamed import load_reference_model
from runtime.generate import Generator


@register_stage("validate", ValidateConfig, consumes="onnx", produces="report")
def validate(cfg: ValidateConfig, inp, ctx) -> StageResult:
    started = time.time()
    torch_model = load_reference_model(ctx.baseline.path)
    reference = "streamed layer by layer" if hasattr(torch_model, "streamed_layers") else "whole model"
    ctx.log(f"  PyTorch baseline in float32: {reference}")
    source = next(a for a in reversed(ctx.history) if a.kind == "hf-model")
    gen = Generator(inp.path, provider=cfg.provider)
    ctx.log(f"  runner provider: {gen.provider}, {gen.flavour} graph; {gen.describe_settings()}")
    memo = BaselineMemo(
        ctx.run_dir.parent / FOLDER, {"artifact": ctx.baseline.fingerprint, "torch": reference}, ctx.log, ctx.fresh
    )
    metrics: dict = {}
    protocol, scored_windows = _perplexity(cfg, torch_model, gen, metrics, ctx)
    prompts = [gen.tokenizer.encode(p) for p in cfg.prompts]
    samples, greedy = _greedy(cfg, prompts, torch_model, gen, metrics, memo)
    chat = chat_checks(cfg.chat, torch_model, gen, metrics, ctx.log, memo) if cfg.chat is not None else None
    if source.path != ctx.baseline.path:  # one PyTorch model in memory at a time: the baseline's work is done
        del torch_model
        release_memory()
        torch_model = load_reference_model(source.path)
    metrics["decode_logits_max_abs_diff"] = _decode_diff(torch_model, gen, prompts[0] + greedy["onnx"][0])
    del torch_model
    provider, flavour, eos_ids = gen.provider, gen.flavour, gen.eos_ids
    del gen  # each target's engine loads its own copy of the weights: one runtime in memory at a time
    release_memory()
    targets = validate_targets(inp.path, scored_windows, prompts, greedy, cfg.max_new_tokens, eos_ids, metrics, ctx.log)
    thresholds, gates_from = gates_for(cfg.thresholds, cfg.default_gates, ctx.history)
    ctx.log(f"  gates ({gates_from}): {thresholds}")
    failures = gate(metrics, thresholds)
    report = {
        "artifact": str(inp.path),
        "baseline": str(ctx.baseline.path),
        "export_source": str(source.path),
        "provider": provider,
        "graph": flavour,
        "torch_reference": reference,
        "metrics": metrics,
        "thresholds": thresholds,
        "thresholds_from": gates_from,
        "failures": failures,
        "passed": not failures,
        "protocol": protocol,
        "samples": samples,
        "chat": chat,
        "targets": targets,
        "seconds": round(time.time() - started, 1),
        "quantization": _quantization_summary(ctx.history),
    }
    write_reports(ctx.out_dir, report)
    return StageResult(
        metrics=metrics,
        info={"protocol": protocol, "provider": provider, "torch_reference": reference},
        passed=not failures,
        failures=failures,
    )


def gate(metrics: dict, thresholds: dict[str, float]) -> list[str]:
    """Every threshold checked; each failure names the metric, its value and its limit."""
    failures = []
    for key, limit in thresholds.items():
        side = VALIDATE_METRICS[key.partition("@")[0]]
        per_domain = [k for k in metrics if k.startswith(f"{key}@")]  # a plain limit holds on every text
        for name in per_domain or [key]:
            value = metrics.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                failures.append(f"{name} = {value} (not measured; limit {side} {limit:g})")
            elif (side == "max" and value > limit) or (side == "min" and value < limit):
                failures.append(f"{name} = {value:.6g} {'>' if side == 'max' else '<'} {side} {limit:g}")
    if metrics.get("nonfinite_logits"):
        failures.append(f"nonfinite_logits = {metrics['nonfinite_logits']} (NaN/Inf in the ONNX logits)")
    return failures


def _perplexity(
    cfg: ValidateConfig, torch_model, gen: Generator, metrics: dict, ctx
) -> tuple[dict, list[ScoredWindow]]:
    """Perplexity, KL and top-1 agreement on each evaluation text. The first text's figures go under the plain
    metric names (and its windows to the export targets' checks); with several, each also as `metric@domain`."""
    domains = cfg.domains
    protocols, first_windows = {}, None
    for name, src in domains.items():
        found, protocol, scored_windows = _score_text(name, src, cfg, torch_model, gen, ctx)
        protocols[name] = protocol
        if first_windows is None:
            first_windows = scored_windows
            metrics.update(found)
        else:  # the prefill checks hold over every text
            metrics["nonfinite_logits"] += found["nonfinite_logits"]
            metrics["window_logits_max_abs_diff"] = max(
                metrics["window_logits_max_abs_diff"], found["window_logits_max_abs_diff"]
            )
        if len(domains) > 1:
            metrics.update({f"{key}@{name}": found[key] for key in DOMAIN_METRICS})
    protocol = next(iter(protocols.values()))
    return ({**protocol, "domains": protocols} if len(domains) > 1 else protocol), first_windows


def _score_text(
    name: str, src, cfg: ValidateConfig, torch_model, gen: Generator, ctx
) -> tuple[dict, dict, list[ScoredWindow]]:
    key = "validate.eval_data" + (f".{name}" if isinstance(cfg.eval_data, dict) else "")
    try:
        text = load_text(src.source, src.split, src.hub_config, src.text_field)
    except DataError as e:
        raise StageError(f"{key}: {e}") from e
    ids = np.array(gen.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    wins = windows(len(ids), cfg.context_length, cfg.stride, cfg.max_windows)
    if not wins:
        raise StageError(f"{key}: {src.source} has {len(ids)} tokens, too few for one window")
    bos = _bos_id(gen) if cfg.add_bos else None
    nll = {"torch": 0.0, "onnx": 0.0}
    scored = agree = nonfinite = 0
    kl_sum, max_diff = 0.0, 0.0
    scored_windows = []
    inputs = [scored_window(ids, w.begin, w.end, w.scored, bos) for w in wins]
    refs = _reference_logits(torch_model, [sw.inputs for sw in inputs], gen.contract.vocab_size)
    for w, sw, ref in tqdm(
        zip(wins, inputs, refs), total=len(wins), desc=f"  perplexity windows ({name})", unit="win", leave=False
    ):
        scored_windows.append(sw)
        out = gen.logits(sw.inputs)  # [T, V]
        nonfinite += int((~np.isfinite(out)).sum())
        pos = slice(sw.first, sw.first + w.scored)  # positions whose next token is scored
        targets = torch.from_numpy(sw.targets)
        ref_lp = F.log_softmax(ref[pos].double(), dim=-1)
        onnx_lp = F.log_softmax(torch.from_numpy(out[pos]).double(), dim=-1)
        sw.onnx_top1 = onnx_lp.argmax(-1).numpy()
        nll["torch"] -= ref_lp.gather(1, targets[:, None]).sum().item()
        nll["onnx"] -= onnx_lp.gather(1, targets[:, None]).sum().item()
        kl_sum += (ref_lp.exp() * (ref_lp - onnx_lp)).sum().item()
        agree += int((ref_lp.argmax(-1) == onnx_lp.argmax(-1)).sum())
        max_diff = max(max_diff, float(np.abs(out - ref.numpy()).max()))
        scored += w.scored
    ppl_torch, ppl_onnx = math.exp(nll["torch"] / scored), math.exp(nll["onnx"] / scored)
    found = dict(
        perplexity_baseline=ppl_torch,
        perplexity=ppl_onnx,
        perplexity_delta_pct=(ppl_onnx - ppl_torch) / ppl_torch * 100,
        top1_agreement=agree / scored,
        kl_divergence=kl_sum / scored,
        window_logits_max_abs_diff=max_diff,
        nonfinite_logits=nonfinite,
        scored_tokens=scored,
    )
    ctx.log(
        f"  perplexity ({name}): torch {ppl_torch:.4f}, onnx {ppl_onnx:.4f} over {len(wins)} windows ({scored} tokens)"
    )
    return (
        found,
        {
            "dataset": src.source,
            "split": src.split,
            "hub_config": src.hub_config,
            "text_sha256": text_fingerprint(text),
            "tokens_in_text": int(len(ids)),
            "context_length": cfg.context_length,
            "stride": cfg.stride,
            "windows": len(wins),
            "scored_tokens": scored,
            "bos": "prepended" if bos is not None else "none",
            "perplexity_baseline": ppl_torch,
            "perplexity": ppl_onnx,
        },
        scored_windows,
    )


def _reference_logits(model, inputs: list[np.ndarray], vocab: int, budget: int = 2**30):
    """The baseline's logits [T, V] per window, in order. A streamed model reads every layer once per forward,
    so its windows of one length go through together, as many as `budget` bytes of logits allow; a whole
    model takes them one at a time (what the reference results were measured with)."""
    streamed = hasattr(model, "streamed_layers")
    k = 0
    while k < len(inputs):
        per_batch = max(1, budget // (len(inputs[k]) * vocab * 4)) if streamed else 1
        group = [inputs[k]]
        while len(group) < per_batch and k + len(group) < len(inputs) and len(inputs[k + len(group)]) == len(group[0]):
            group.append(inputs[k + len(group)])
        with torch.no_grad():
            logits = model(torch.from_numpy(np.stack(group))).logits
        yield from logits
        k += len(group)


def _greedy(
    cfg: ValidateConfig, prompts: list[list[int]], torch_model, gen: Generator, metrics: dict, memo: BaselineMemo
) -> tuple[list[dict], dict]:
    """Greedy answers of the baseline (kept in `memo` by an earlier run, or computed) and of the runner to
    `prompts` (cfg.prompts encoded); returns the samples and {"baseline", "onnx"} token lists."""
    batch = len(prompts) if hasattr(torch_model, "streamed_layers") else 1  # a streamed model reads its layers per step
    replies = memo.get(
        "greedy",
        greedy_inputs(prompts, cfg.max_new_tokens, gen.eos_ids, gen.pad_id, batch),
        lambda: torch_greedy(torch_model, prompts, cfg.max_new_tokens, gen.eos_ids, gen.pad_id, batch),
    )
    ref = [reply for reply, _ in replies]
    single = [gen.generate([ids], cfg.max_new_tokens).tokens[0] for ids in prompts]
    batched = gen.generate(prompts, cfg.max_new_tokens).tokens
    metrics["greedy_token_agreement"] = agreement(ref, single)
    metrics["batch_greedy_agreement"] = agreement(single, batched)
    return [
        {"prompt": p, "baseline": gen.tokenizer.decode(r), "onnx": gen.tokenizer.decode(s), "identical": r == s}
        for p, r, s in zip(cfg.prompts, ref, single)
    ], {"baseline": ref, "onnx": single}


def _decode_diff(torch_model, gen: Generator, ids: list[int]) -> float:
    """Runner decode steps (KV cache) vs. PyTorch recomputing the whole prefix: max |Δ logits|."""
    split = max(1, len(ids) // 2)
    logits, state = gen.prefill([ids[:split]], len(ids))
    steps = [logits]
    for t in range(split, len(ids) - 1):
        logits = gen.decode(np.array([ids[t]]), state)
        steps.append(logits)
    with torch.no_grad():
        ref = torch_model(torch.tensor([ids[:-1]])).logits[0, split - 1 :].numpy()
    return float(np.abs(np.concatenate(steps) - ref).max())


def _quantization_summary(history) -> dict | None:
    """What the quantize step (if any) did: method, layers per precision, the sensitivity chart."""
    step = next((a for a in reversed(history) if a.manifest.get("stage") == "quantize"), None)
    if step is None:
        return None
    m = step.manifest
    counts = count_schemes(QuantScheme(**spec) for spec in m.get("plan", {}).values())
    chart = step.path / "sensitivity.png"
    return {
        "method": m["config"]["method"],
        "artifact": str(step.path),
        "layers": counts,
        "float_layers": sorted(m.get("skipped_layers", {})),
        "int8_by_budget": m.get("int8_layers", []),
        "budget_estimate": m.get("estimate"),
        "sensitivity_chart": f"../{step.path.name}/{chart.name}" if chart.exists() else None,
    }  # relative: the run folder moves


def _bos_id(gen: Generator) -> int:
    bos = gen.tokenizer.config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    bos_id = gen.tokenizer.token_id(bos) if bos else None
    if bos_id is None:
        raise StageError("validate.add_bos: the tokenizer names no BOS token; set add_bos: false")
    return bos_id
