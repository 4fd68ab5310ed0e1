"""W8A8 preparation in PyTorch: optional SmoothQuant migration, and the calibrated input scales of static W8A8.

SmoothQuant (Xiao et al., 2022) moves activation outliers into the weights before both are
quantized to int8: per input channel, s = max|X|^α / max|W|^(1-α); the op feeding the linears is
divided by s and the linears' weights multiplied by s (exact in float). Beyond the paper's two norm
groups, v_proj absorbs o_proj's scales where their widths line up, and up_proj absorbs down_proj's
(the SwiGLU product is linear in up_proj's output): down_proj's inputs carry a Llama block's
largest outliers. With `smoothquant: auto`, α is searched per group and layer: the candidate whose
int8 weights times int8 activations (the recipe's activation scheme) best reproduce the float
outputs on calibration tokens, "no migration" among them. The int8 quantization itself happens at
export, on the traced graph (ONNX Runtime's quantizer, or our per-token and static rewrites).

Static W8A8 fixes one symmetric int8 scale per linear input ahead of time (vLLM's and
llm-compressor's static scheme). A plain max |x| over the calibration data wastes most of the 256
levels on a few outlier tokens, so the scale is a clipped maximum: the clip ratio whose int8 round
trip best reproduces the float outputs of the linears sharing that input, on calibration tokens.

With `hadamard`, down_proj's input is also rotated by a block Hadamard transform in the graph, after
the migration (pipeline.quant.rotation): SmoothQuant flattens the channels that are large for every
token, the rotation spreads those that are large in a few tokens, which is what a static scale
cannot follow. The α search and the clip search then model the rotated rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from calibration.collect import capture_layer_inputs, decoder_layers, run_layer
from pipeline.quant.rotation import rotate
from pipeline.stages.quantize.awq import collect_inputs, feeds, fold_scale, lines_up, norm_offset, scale_groups

ROTATED = (
    "mlp.down_proj",
)  # hadamard: the inputs rotated at run time (no linear op feeds them to fold a rotation into)
AUTO_ALPHAS = (None, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # None: no migration (s = 1)
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # static: fractions of max |x| tried as the int8 range


def smoothquant(
    model,
    batches: list[torch.Tensor],
    alpha: float | str,
    activations: str,
    search_tokens: int = 2048,
    seed: int = 0,
    log: Callable[[str], None] = print,
    hadamard: bool = False,
) -> dict[str, dict]:
    """Fold SmoothQuant scales into every decoder layer, one layer at a time.

    Returns, per smoothed group (named by its first linear): the α used (None: left alone), the
    largest |x| of its inputs before, and the int8 output error relative to no migration.
    """
    candidates = AUTO_ALPHAS if alpha == "auto" else (float(alpha),)
    hidden, kwargs = capture_layer_inputs(model, batches)
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, dict] = {}
    for index, layer in enumerate(tqdm(decoder_layers(model), desc="  smoothquant layers", unit="layer")):
        stats = collect_inputs(layer, hidden, kwargs, search_tokens, gen, index)
        for feeder, names in scale_groups(layer):
            if not feeds(layer, feeder):
                continue
            feed, mods = layer.get_submodule(feeder), [layer.get_submodule(n) for n in names]
            if not lines_up(feed, mods):
                continue
            x, _ = stats[names[0]].result()
            x_max = stats[names[0]].max.clamp(min=1e-5)
            rot = rotate if hadamard and names == ROTATED else None
            chosen, s, error = search_alpha(x, x_max, [m.weight.data for m in mods], candidates, activations, rot)
            if s is not None:
                fold_scale(feed, mods, s, norm_offset(layer))
            report[f"model.layers.{index}.{names[0]}"] = {
                "alpha": chosen,
                "max_abs_input_before": round(float(x_max.max()), 3),
                "error_vs_none": round(error, 4),
            }
        hidden = run_layer(layer, hidden, kwargs)  # the folds are exact: the next layer's inputs are unchanged
    _log_summary(report, log)
    return report


def search_alpha(
    x: torch.Tensor,
    x_max: torch.Tensor,
    weights: list[torch.Tensor],
    candidates: tuple,
    activations: str,
    rot: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float | None, torch.Tensor | None, float]:
    """The candidate α with the smallest int8 output error on the token sample x; its scales; that
    error over the error without migration. `rot`: the graph rotates the migrated input (and the weights)."""
    w_max = torch.cat(weights).abs().amax(0).clamp(min=1e-5)
    exact = [x @ w.T for w in weights]

    def error(s: torch.Tensor | None) -> float:
        xs, ws = (x, weights) if s is None else (x / s, [w * s for w in weights])
        if rot is not None:
            xs, ws = rot(xs), [rot(w) for w in ws]
        xq = fake_quant_activations(xs, activations)
        return sum(float((xq @ fake_quant_weight(w).T - e).pow(2).sum()) for w, e in zip(ws, exact))

    base = error(None)
    best_error, best_alpha, best_s = (base if None in candidates else float("inf")), None, None
    for a in (c for c in candidates if c is not None):
        s = (x_max.pow(a) / w_max.pow(1 - a)).clamp(min=1e-5)
        if (e := error(s)) < best_error:
            best_error, best_alpha, best_s = e, a, s
    return best_alpha, best_s, (best_error / base if base > 0 else 1.0)


def fake_quant_activations(x: torch.Tensor, activations: str) -> torch.Tensor:
    """x through int8 and back as the exported graph quantizes it: symmetric per token for
    dynamic_per_token; symmetric per tensor for static (here with the sample's own max |x|; the
    calibrated scale is clipped after the migration is chosen); one asymmetric uint8 range for the
    tensor for dynamic (ONNX Runtime's)."""
    if activations == "dynamic_per_token":
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        return (x / scale).round().clamp(-127, 127) * scale
    if activations == "static":
        return fake_quant_static(x, float(x.abs().max()) / 127)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max(hi - lo, 1e-8) / 255
    zero = round(-lo / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero) * scale


def fake_quant_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The static graph's rounding: QuantizeLinear to uint8 with zero point 128, i.e. int8 codes in [-128, 127]."""
    scale = max(scale, 1e-12)
    return (x / scale).round().clamp(-128, 127) * scale


def static_input_scales(
    model,
    batches: list[torch.Tensor],
    modules: list[str],
    search_tokens: int = 2048,
    seed: int = 0,
    log: Callable[[str], None] = print,
    hadamard: bool = False,
) -> dict[str, dict]:
    """Per W8A8 linear (names as in `modules`), the calibrated int8 scale of its input and the clip
    ratio chosen; linears fed the same tensor share one. Layer by layer on the (smoothed) float model;
    with `hadamard`, ROTATED inputs are calibrated as the graph rounds them, rotated."""
    wanted = set(modules)
    hidden, kwargs = capture_layer_inputs(model, batches)
    gen = torch.Generator().manual_seed(seed)
    scales: dict[str, dict] = {}
    transforms = {name: rotate for name in ROTATED} if hadamard else None
    for index, layer in enumerate(tqdm(decoder_layers(model), desc="  static input scales", unit="layer")):
        stats = collect_inputs(layer, hidden, kwargs, search_tokens, gen, index, transforms)
        for _, names in scale_groups(layer):
            chosen = [
                (f"model.layers.{index}.{n}", layer.get_submodule(n))
                for n in names
                if f"model.layers.{index}.{n}" in wanted
            ]
            if chosen:
                x, _ = stats[names[0]].result()
                weights = [m.weight.data for _, m in chosen]
                if hadamard and names == ROTATED:
                    weights = [rotate(w) for w in weights]
                found = search_clip(x, float(stats[names[0]].max.max()), weights)
                scales.update({name: found for name, _ in chosen})
        hidden = run_layer(layer, hidden, kwargs)
    if "lm_head" in wanted:
        with torch.no_grad():
            final = torch.cat([model.model.norm(h).reshape(-1, h.shape[-1]) for h in hidden])
        sample = final[torch.randperm(len(final), generator=gen)[:search_tokens]]
        scales["lm_head"] = search_clip(sample, float(final.abs().max()), [model.lm_head.weight.data])
    clipped = sum(v["clip"] < 1 for v in scales.values())
    log(f"  static input scales for {len(scales)} linears; {clipped} clipped below their calibration max |x|")
    return scales


def search_clip(x: torch.Tensor, max_abs: float, weights: list[torch.Tensor]) -> dict:
    """The clip ratio r (scale = r * max|x| / 127) with the smallest int8 output error on the token sample x."""
    exact = [x @ w.T for w in weights]
    quantized = [fake_quant_weight(w) for w in weights]
    best = None
    for ratio in CLIP_RATIOS:
        scale = max(max_abs * ratio, 1e-8) / 127
        xq = fake_quant_static(x, scale)
        error = sum(float((xq @ q.T - e).pow(2).sum()) for q, e in zip(quantized, exact))
        if best is None or error < best[0]:
            best = (error, ratio, scale)
    return {"scale": best[2], "clip": best[1], "max_abs": round(max_abs, 4)}


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel, as the exported graph stores the weights."""
    scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def _log_summary(report: dict[str, dict], log: Callable[[str], None]) -> None:
    kinds: dict[str, list[dict]] = {}
    for name, r in report.items():
        kinds.setdefault(name.split(".", 3)[-1], []).append(r)
    for kind, rows in kinds.items():
        alphas = [r["alpha"] for r in rows]
        used = sorted(a for a in alphas if a is not None)
        median = f"median alpha {used[len(used) // 2]}" if used else "alpha none"
        left = sum(a is None for a in alphas)
        ratio = float(np.mean([r["error_vs_none"] for r in rows]))
        log(
            f"  smoothquant {kind}: {median}, {left} of {len(rows)} layers left alone; int8 output error "
            f"{ratio:.2f}x that without migration (mean)"
        )
