"""How long each step of a recipe will take on this machine, known before any heavy work.

Each step's work is counted from the model's shape and the recipe in the unit that bounds it, then
turned into seconds with this machine's float32 matmul rate, measured here in a quarter of a second:

    model           a GGUF dequantized parameter by parameter; a safetensors checkpoint linked or
                    converted at disk speed
    quantize rtn    a fixed cost per parameter (grouping, the range search, packing)
    quantize        GPTQ/AWQ per decoder layer: its forwards over the calibration tokens, the Hessians
                    (XᵀX per distinct input), GPTQ's column sweep (N·K² per linear) and the scale refit
                    (about 14·N·K²: most rows settle in a round and stop after the next); then the
                    head; with a sensitivity budget, one forward per candidate from its own layer on
    export          a fixed cost per parameter (tracing, the graph rewrites, the parity sessions)
    validate        the perplexity windows through the PyTorch reference and the runner, and the greedy
                    checks, each decode step reading every weight once
    distill         the teacher's forward and the student's forward and backward on every token

The efficiencies below (what share of the matmul rate each kind of work reaches) and the per-parameter
costs were fitted on a 2-core AVX2 machine measuring 215 GFLOP/s: GPTQ's on the phases of the SmolLM2
reference's GPTQ recipe (sensitivity 146 s, 8.1 s a layer), the rest on the scale ladder's real-shape
checkpoints; `python -m benchmarks.checks.estimates` sets them beside what a run
then measures. Costs that are not matmuls are scaled by the same rate: a machine twice as fast at
matmuls is taken as twice as fast at everything, which holds roughly across CPUs, not for GPUs.
"""

from __future__ import annotations

import functools
import importlib.util
import time

from pipeline.estimate import ModelShape
from pipeline.streamed import WHOLE_MODEL_LIMIT

REFERENCE_RATE = 215e9  # float32 FLOP/s of the machine the constants were fitted on

LAYER_FORWARD = 0.74  # share of the matmul rate: a decoder layer's forward (sdpa) over 8 x 512-token batches
REFIT = 0.6  # the scale refit's block products, error products and solves
SENSITIVITY = 0.59  # the sensitivity pass: short blocks from each candidate's layer on, and the KL
TRAINING = 0.45  # distillation's forwards and backwards
PREFILL = 0.7  # the perplexity windows, a whole window a forward
DECODE_BYTES_PER_S = 20e9  # weights read per second by one decode step
STREAMED_BYTES_PER_S = 1e9  # a streamed reference's pass: the checkpoint read and made float32, layer by layer
DECODE_STEP_S = 3e-4  # each decode step's fixed cost per decoder layer (kernel launches, Python)

GGUF_S_PER_PARAM = 130e-9  # reading, dequantizing and writing a GGUF tensor
RTN_S_PER_PARAM = 30e-9
EXPORT_S_PER_PARAM = {"float": 70e-9, "quantized": 25e-9}
KL_FLOPS_PER_LOGIT = 40  # float64 log-softmax, exp and the sum, per vocabulary entry
# layer forwards per calibration batch: GPTQ's Hessian pass stops before down_proj (3/4 of one), then the quantized
# layer runs for the next layer's inputs; AWQ also replays its blocks for the searches
GPTQ_FORWARDS = {"gptq": 1.75, "awq": 3.5, "w8a8": 1.5}
CALIBRATED_S_PER_PARAM = 100e-9  # outside the layer loop: the calibration inputs, the head's codes, packing, writing
WHOLE_MODEL_S_PER_PARAM = 150e-9  # a sensitivity budget's whole float32 model: loaded, and its layers' inputs kept


@functools.cache
def matmul_rate() -> float:
    """This machine's float32 matmul FLOP/s with torch's threads: the best of ten trials of 25 ms each, so that a
    moment of contention from another process does not make a whole run's estimate slow."""
    import torch

    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    a @ b
    best = 0.0
    for _ in range(10):
        started, reps = time.perf_counter(), 0
        while time.perf_counter() - started < 0.025:
            a @ b
            reps += 1
        best = max(best, 2 * 512 * 1024 * 1024 * reps / (time.perf_counter() - started))
    return best


def estimate_seconds(
    shape: ModelShape, stages: list[tuple[str, object]], source_kind: str, rate: float | None = None
) -> list[float | None]:
    """Per step (the model step, then each stage of the recipe in order), the estimated wall seconds; None
    where the work cannot be known before it starts (a hub model's download)."""
    rate = rate or matmul_rate()
    scale = REFERENCE_RATE / rate
    out: list[float | None] = [_model_seconds(shape, source_kind, scale)]
    quantized: object | None = None
    for name, cfg in stages:
        if name == "quantize":
            out.append(_quantize_seconds(shape, cfg, rate))
            quantized = cfg
        elif name == "export":
            kind = "float" if quantized is None else "quantized"
            out.append(3 + shape.parameters * EXPORT_S_PER_PARAM[kind] * scale)
        elif name == "validate":
            out.append(_validate_seconds(shape, cfg, quantized, rate))
        elif name == "distill":
            out.append(_distill_seconds(shape, cfg, rate))
        else:
            out.append(None)
    return out


def describe(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _model_seconds(shape: ModelShape, source_kind: str, scale: float) -> float | None:
    if source_kind == "gguf":
        return 1 + shape.parameters * GGUF_S_PER_PARAM * scale
    if source_kind == "dir":
        return 0.5 + shape.stored_bytes / (1.5e9 if shape.linked else 0.4e9)
    return None


def _widths(shape: ModelShape) -> tuple[int, int]:
    return shape.q_width or shape.hidden, shape.kv_width or shape.hidden


def _linears(shape: ModelShape) -> list[tuple[int, int]]:
    """(output rows N, inputs K) of one decoder layer's linears: q, k, v, o, gate, up, down."""
    h, i = shape.hidden, shape.intermediate
    q, kv = _widths(shape)
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def _layer_flops(shape: ModelShape, sequence: int) -> float:
    """One token's FLOPs through one decoder layer: its linears and causal attention over `sequence`."""
    return 2 * sum(n * k for n, k in _linears(shape)) + 2 * sequence * _widths(shape)[0]


def _solve_flops(n: int, k: int, refit: bool) -> tuple[float, float]:
    """(GPTQ's sweep and Cholesky factors, the refit) for one linear of N rows and K inputs."""
    return 2 * n * k * k + 2 * k**3, (14 * n * k * k if refit else 0.0)


def _quantize_seconds(shape: ModelShape, cfg, rate: float) -> float:
    scale = REFERENCE_RATE / rate
    budget = getattr(cfg, "budget", None)
    seconds = 0.0
    if cfg.method == "rtn":
        seconds = shape.parameters * RTN_S_PER_PARAM * scale
    else:
        cal = cfg.calibration
        tokens = cal.num_samples * cal.sequence_length
        h, i = shape.hidden, shape.intermediate
        q, _ = _widths(shape)
        refit = bool(getattr(cfg, "refit_scales", False))
        codes = cfg.method == "gptq" or (cfg.method == "awq" and cfg.awq.codes == "gptq")
        forward = tokens * _layer_flops(shape, cal.sequence_length) * GPTQ_FORWARDS[cfg.method]
        hessians = tokens * 2 * (2 * h * h + q * q + i * i) * 7 / 12  # the upper triangles only
        sweep = refit_flops = 0.0
        if codes:
            for n, k in _linears(shape):
                a, b = _solve_flops(n, k, refit)
                sweep, refit_flops = sweep + a, refit_flops + b
        if cfg.method == "awq":  # the scale search: a grid of 20 over `search_tokens` per input
            forward += 20 * min(tokens, cfg.search_tokens) * _layer_flops(shape, cal.sequence_length)
        per_layer = (forward + hessians + sweep) / (rate * LAYER_FORWARD) + refit_flops / (rate * REFIT)
        seconds = shape.layers * per_layer
        if getattr(cfg, "lm_head", "float") != "float" and codes:
            a, b = _solve_flops(shape.vocab, h, refit)
            seconds += (tokens * 2 * h * h + a) / (rate * LAYER_FORWARD) + b / (rate * REFIT)
        seconds += shape.parameters * CALIBRATED_S_PER_PARAM * scale
    if budget is not None:
        seconds += _sensitivity_seconds(shape, budget, cfg, rate) + shape.parameters * WHOLE_MODEL_S_PER_PARAM * scale
    return seconds


def _sensitivity_seconds(shape: ModelShape, budget, cfg, rate: float) -> float:
    """One forward per candidate linear from its own decoder layer to the logits, and its KL to the float
    model's; the head's candidate (and a tied embedding's) runs the whole model."""
    tokens = budget.sensitivity_samples * budget.sensitivity_length
    layer = _layer_flops(shape, budget.sensitivity_length)
    head = 2 * shape.vocab * shape.hidden
    per_layer = len(_linears(shape))
    layers = shape.layers
    candidates = per_layer * layers
    flops = tokens * per_layer * (layer * layers * (layers + 1) / 2 + layers * head)
    if getattr(cfg, "lm_head", "float") != "float":
        candidates += 1
        flops += tokens * (layers * layer + head)
    flops += candidates * tokens * shape.vocab * KL_FLOPS_PER_LOGIT
    return flops / (rate * SENSITIVITY)


def _decode_seconds(steps: float, weight_bytes: float, layers: int) -> float:
    return steps * (weight_bytes / DECODE_BYTES_PER_S + layers * DECODE_STEP_S)


def _validate_seconds(shape: ModelShape, cfg, quantized, rate: float) -> float:
    """The perplexity windows through the float32 PyTorch reference and the runner (and onnxruntime-genai where it
    is installed), then greedy replies: the reference's one prompt at a time, the runner's one by one and batched."""
    float32 = shape.float32_bytes
    if quantized is None:
        graph = float32
    elif quantized.method == "w8a8":
        graph = float32 / 4
    else:
        graph = float32 * (getattr(quantized, "bits", 4) / 32 + 1 / 16)
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    engines = 3 if genai else 2
    tokens = len(cfg.domains) * cfg.max_windows * cfg.context_length
    prefill = engines * tokens * (2 * shape.parameters + 2 * cfg.context_length * _widths(shape)[0] * shape.layers)
    seconds = prefill / (rate * PREFILL)
    greedy = len(cfg.prompts) * cfg.max_new_tokens
    if float32 > WHOLE_MODEL_LIMIT:  # a streamed reference: one pass per window, per decode step (all prompts at once)
        seconds += (
            (len(cfg.domains) * cfg.max_windows + cfg.max_new_tokens + 1) * shape.stored_bytes / STREAMED_BYTES_PER_S
        )
    else:
        seconds += _decode_seconds(greedy, float32, shape.layers)
    seconds += _decode_seconds(greedy * (2 if genai else 1) + cfg.max_new_tokens, graph, shape.layers)
    if cfg.chat is not None:
        from calibration.chat_set import builtin_chat_set

        prompts = len(builtin_chat_set()) if cfg.chat.prompts is None else 32
        steps = -(-prompts // cfg.chat.batch_size) * cfg.chat.max_new_tokens
        seconds += _decode_seconds(steps, float32, shape.layers) + _decode_seconds(steps, graph, shape.layers)
        # the replies scored by both models: prompt and reply as one prefill each
        seconds += 2 * prompts * (cfg.chat.max_new_tokens + 64) * 2 * shape.parameters / (rate * PREFILL)
    return seconds


def _distill_seconds(shape: ModelShape, cfg, rate: float) -> float:
    """The teacher's forward and the student's forward and backward on every training token (the student at the
    depth the recipe asks for), the teacher correction's training and the held-out evaluations."""
    if cfg.num_layers is not None:
        depth = cfg.num_layers / shape.layers
    elif cfg.keep_fraction is not None:
        depth = cfg.keep_fraction
    else:
        depth = min(1.0, cfg.param_budget_m * 1e6 / shape.parameters)
    student = shape.parameters * depth
    flops = cfg.tokens * (2 * shape.parameters + 6 * student)
    if cfg.teacher_correction is not None:
        flops += cfg.teacher_correction.tokens * 6 * shape.parameters
    return flops / (rate * TRAINING)
