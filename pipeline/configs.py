"""Typed, frozen recipe sections. Every default of the recipe lives here and nowhere else.

Each stage config carries a `version`: bump it when the stage's output for the same settings
changes, so cached artifacts built by the old code are rebuilt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pipeline.errors import RecipeError, did_you_mean

ExportTarget = Literal["onnx", "gguf", "hf-quantized"]

# Metrics the validate stage computes, and which side of the threshold passes.
VALIDATE_METRICS = {
    "perplexity_delta_pct": "max",  # (ppl_onnx - ppl_torch) / ppl_torch * 100
    "perplexity": "max",  # the artifact's own perplexity
    "top1_agreement": "min",  # teacher-forced next-token argmax agreement on the eval windows
    "kl_divergence": "max",  # mean KL(torch || onnx) of next-token distributions on the eval windows
    "greedy_token_agreement": "min",  # greedy tokens equal to the baseline's, over the prompt set
    "batch_greedy_agreement": "min",  # runner greedy batched (left padding) vs. one prompt at a time
    "decode_logits_max_abs_diff": "max",  # KV-cache decode steps vs. the export's source model, full recompute
    "window_logits_max_abs_diff": "max",  # prefill logits on the eval windows vs. PyTorch
    "gguf_perplexity_vs_onnx_pct": "max",  # |ppl through llama.cpp - ppl of the ONNX artifact| / ppl_onnx * 100
    "gguf_greedy_agreement": "min",  # llama.cpp greedy tokens equal to the baseline's, over the prompt set
    "gguf_onnx_greedy_agreement": "min",  # llama.cpp greedy tokens equal to the ONNX runner's
    "gguf_onnx_top1_agreement": "min",  # llama.cpp's next-token argmax equal to the ONNX artifact's, eval windows
    # the same four through onnxruntime-genai (the onnx target's genai_config.json) and through
    # transformers + compressed-tensors (the hf-quantized target)
    "genai_perplexity_vs_onnx_pct": "max",
    "genai_greedy_agreement": "min",
    "genai_onnx_greedy_agreement": "min",
    "genai_onnx_top1_agreement": "min",
    "hf_quantized_perplexity_vs_onnx_pct": "max",
    "hf_quantized_greedy_agreement": "min",
    "hf_quantized_onnx_greedy_agreement": "min",
    "hf_quantized_onnx_top1_agreement": "min",
    # validate.chat: greedy chat replies of the artifact (the runner) to the chat set, next to the baseline's
    "chat_fact_accuracy": "min",  # replies to the factual questions that name an accepted answer
    "chat_fact_accuracy_delta": "min",  # chat_fact_accuracy minus the baseline's (negative: facts lost)
    "chat_turn_end_rate": "min",  # replies that end their turn within chat.max_new_tokens
    "chat_reply_perplexity": "max",  # the baseline's greedy replies, teacher-forced through the artifact
    "chat_reply_top1_agreement": "min",  # the artifact's argmax equal to the baseline's reply token
}
CHAT_METRICS = tuple(name for name in VALIDATE_METRICS if name.startswith("chat_"))
# measured on every evaluation text; with several (eval_data a mapping), also as `metric@domain` for each
DOMAIN_METRICS = ("perplexity_delta_pct", "perplexity", "top1_agreement", "kl_divergence")
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][\w-]*$")


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from: a hub id, a local HF checkpoint directory, or a .gguf file."""

    source: str  # a hub id, a local checkpoint folder or a .gguf file; relative paths are relative to the recipe
    revision: str | None = None  # the hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # run the checkpoint's own Python code: only for a checkpoint you trust
    allow_pickle: bool = False  # load *.bin / *.pt checkpoints; off by default (arbitrary code on load)
    eos_tokens: tuple[str, ...] = ()  # extra end tokens; end-of-turn tokens of the chat template are added anyway
    # the dtype the model step stores: auto keeps the checkpoint's own (a bf16 checkpoint stays bf16, half of float32
    # on disk); a GGUF file is dequantized to float32, which auto keeps (its codes' values need more than bf16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    version: int = 4


@dataclass(frozen=True)
class TextSourceConfig:
    """A text corpus: a built-in name (wikitext-2, tinyshakespeare), a local text file, or a hub dataset."""

    source: str  # wikitext-2, tinyshakespeare, python-code (built in), a .txt file, or a hub dataset id
    split: str = "test"  # built-in corpora: valid or test (tinyshakespeare: train, test, all); a hub dataset's split
    hub_config: str | None = None  # the hub dataset's configuration name, e.g. wikitext-2-v1
    text_field: str = "text"  # a hub dataset's column holding the text


@dataclass(frozen=True)
class MixedTextSourceConfig(TextSourceConfig):
    """One part of a calibration mix: a text source and its share of the blocks."""

    weight: float = 1.0  # this text's share of the calibration blocks, relative to the others

    def __post_init__(self):
        if not self.weight > 0:
            raise RecipeError(f"weight: must be positive, got {self.weight}")


HeadPrecision = Literal["float", "int8", "int4"]


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration text: `num_samples` blocks of `sequence_length` tokens drawn with `seed`, from one source or a
    weighted mix (`data: [{source: wikitext-2, split: valid, weight: 2}, {source: python-code, split: valid}]`)."""

    data: TextSourceConfig | tuple[MixedTextSourceConfig, ...] = field(
        default_factory=lambda: TextSourceConfig("wikitext-2", "valid")
    )
    num_samples: int = 128  # calibration blocks
    sequence_length: int = 512  # tokens per block
    seed: int = 0  # which blocks are drawn
    batch_size: int = 8  # blocks per forward pass

    def __post_init__(self):
        for name in ("num_samples", "sequence_length", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if isinstance(self.data, tuple) and not self.data:
            raise RecipeError("data: an empty mix; give one source, or a list of {source, split, weight}")


@dataclass(frozen=True)
class BudgetConfig:
    """Pick INT8 instead of INT4 for the most sensitive layers until one limit holds (set exactly one)."""

    max_size_mb: float | None = None  # estimated size of the exported weights, embeddings included
    max_size_ratio: float | None = None  # the same as a multiple of the all-INT4 size: a budget for any model
    max_perplexity_increase_pct: float | None = None  # estimated with round-to-nearest on calibration text
    sensitivity_samples: int = 4  # calibration blocks for the per-layer KL measurement
    sensitivity_length: int = 128  # tokens per block

    def __post_init__(self):
        limits = ("max_size_mb", "max_size_ratio", "max_perplexity_increase_pct")
        if sum(getattr(self, key) is not None for key in limits) != 1:
            raise RecipeError(f"budget: set exactly one of {', '.join(limits)}")
        for key in limits:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"{key}: must be positive, got {value}")
        if self.max_size_ratio is not None and self.max_size_ratio < 1:
            raise RecipeError(f"max_size_ratio: {self.max_size_ratio} is below 1, the all-INT4 size itself")
        if self.sensitivity_samples < 1 or self.sensitivity_length < 8:
            raise RecipeError("sensitivity_samples/sensitivity_length: need at least 1 block of 8 tokens")


@dataclass(frozen=True)
class DistillLossConfig:
    """Weights of the loss terms (at least one positive) and their settings."""

    kd: float = 1.0  # KL(teacher ‖ student) on next-token distributions, at `temperature`
    temperature: float = 2.0
    ce: float = 0.0  # cross-entropy on the text itself
    hidden: float = 0.0  # hidden-state loss over `layer_map`
    hidden_loss: Literal["cosine", "mse"] = "cosine"
    layer_map: dict[str, int] | None = None  # student layer -> teacher layer (default: where each kept layer came from)

    def __post_init__(self):
        for key in ("kd", "ce", "hidden"):
            if getattr(self, key) < 0:
                raise RecipeError(f"{key}: a loss weight cannot be negative, got {getattr(self, key)}")
        if self.kd + self.ce + self.hidden <= 0:
            raise RecipeError("kd/ce/hidden: every loss weight is 0; give at least one a positive weight")
        if self.temperature <= 0:
            raise RecipeError(f"temperature: must be positive, got {self.temperature}")
        for key in self.layer_map or {}:
            if not key.isdigit():
                raise RecipeError(f"layer_map.{key}: student layers are numbered 0, 1, …")


@dataclass(frozen=True)
class TeacherAnswersConfig:
    """Sequence-level distillation data: the teacher answers `samples` chat prompts (sampled with
    `temperature` / `top_p`, seeded) and the conversations join the training text. Answers that hit
    `max_new_tokens` before the end of their turn are dropped. `prompts`: a text file (one prompt per
    line) or a hub dataset (`text_field`: a prompt string or chat messages); none = the built-in set,
    whose passage tasks quote the first training text."""

    samples: int = 512
    prompts: TextSourceConfig | None = None
    max_new_tokens: int = 192
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 32  # prompts answered together by the runner
    system: str | None = None  # system message; none = the chat template's default

    def __post_init__(self):
        for key in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key}: must be a positive integer, got {getattr(self, key)}")
        if self.temperature < 0:
            raise RecipeError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RecipeError(f"top_p: must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class TeacherCorrectionConfig:
    """Teacher correction (Minitron, Sreenivas et al. 2024): before it is pruned and imitated, the teacher
    is fine-tuned with cross-entropy on the training text for `tokens`, at `lr` (the rest of the
    schedule as the student's). The student then starts from, and learns from, a teacher already
    adapted to the text instead of one that KD would pull away from it."""

    tokens: int = 250_000
    lr: float = 1e-4

    def __post_init__(self):
        if self.tokens < 1:
            raise RecipeError(f"tokens: must be a positive integer, got {self.tokens}")
        if self.lr <= 0:
            raise RecipeError(f"lr: must be positive, got {self.lr}")


@dataclass(frozen=True)
class DistillConfig:
    """A smaller student from the teacher (the step before): pruned, then trained to imitate it.

    The shape: `num_layers`, `keep_fraction` (of the teacher's layers, for a recipe that fits any model) or
    `param_budget_m` (total parameters, millions) for depth, and
    optionally `intermediate_size` and `num_key_value_heads` for width. The training text is cut
    into blocks of `sequence_length` tokens; the last `heldout_fraction` of each text is kept out
    for evaluation (unless `eval_data` is given). `tokens` is the training budget.
    """

    num_layers: int | None = None
    keep_fraction: float | None = None  # 0.67: a 30-layer teacher gives a 20-layer student
    param_budget_m: float | None = None
    # uniform | loss (CE increase when the layer is skipped) | hidden (block influence)
    layer_choice: Literal["uniform", "loss", "hidden"] = "loss"
    intermediate_size: int | None = None
    num_key_value_heads: int | None = None
    importance_samples: int = 8  # calibration blocks that score layers, channels and heads
    train_data: tuple[TextSourceConfig, ...] = (
        TextSourceConfig("wikitext-2", "valid"),
        TextSourceConfig("tinyshakespeare", "all"),
    )
    eval_data: TextSourceConfig | None = None
    heldout_fraction: float = 0.05
    sequence_length: int = 256
    tokens: int = 400_000  # training budget: steps = tokens / (batch_size * grad_accum * sequence_length)
    batch_size: int = 4
    grad_accum: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # then cosine to lr / 10
    max_grad_norm: float = 1.0
    eval_every: int = 20  # steps
    eval_samples: int = 16  # held-out blocks per evaluation
    checkpoint_every: int = 20  # steps; a killed run resumes from the last one
    bf16: Literal["auto", "true", "false"] = "auto"  # auto (where the GPU or CPU computes bf16 natively) | true | false
    # under a launcher: ddp (a whole teacher and student in each process) | fsdp (each process holds 1/N)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 0
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    teacher_answers: TeacherAnswersConfig | None = None  # chat turns the teacher writes, added to train_data
    teacher_correction: TeacherCorrectionConfig | None = None  # fine-tune the teacher on the text first
    version: int = 3

    def __post_init__(self):
        depth = (self.num_layers, self.keep_fraction, self.param_budget_m)
        if sum(value is not None for value in depth) != 1:
            raise RecipeError(
                "num_layers/keep_fraction/param_budget_m: set exactly one (the student's depth, the share of the "
                "teacher's layers it keeps, or its size in millions)"
            )
        if self.keep_fraction is not None and not 0 < self.keep_fraction < 1:
            raise RecipeError(f"keep_fraction: {self.keep_fraction} is not in (0, 1)")
        if not 0 <= self.heldout_fraction < 0.5:
            raise RecipeError(f"heldout_fraction: {self.heldout_fraction} is not in [0, 0.5)")
        if self.eval_data is None and self.heldout_fraction == 0:
            raise RecipeError("heldout_fraction: 0 leaves nothing to evaluate on; give eval_data or a fraction > 0")
        for key in (
            "sequence_length",
            "tokens",
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_samples",
            "checkpoint_every",
            "importance_samples",
        ):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key}: must be a positive integer, got {getattr(self, key)}")
        if self.lr <= 0:
            raise RecipeError(f"lr: must be positive, got {self.lr}")
        if not self.train_data:
            raise RecipeError("train_data: give at least one text source")


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ's column-by-column rounding under the calibration Hessian (method gptq, and method awq with
    `awq.codes: gptq`)."""

    damp: float = 0.01  # fraction of the mean Hessian diagonal added for stability
    act_order: bool = True  # visit columns by decreasing Hessian diagonal
    mse_clip: bool = True  # choose each group's range by least rounding error, not plain min/max

    def __post_init__(self):
        if not 0 < self.damp < 1:
            raise RecipeError(f"damp: {self.damp} must be between 0 and 1 (0.01 is usual)")


@dataclass(frozen=True)
class AwqConfig:
    """AWQ's per-channel scaling, searched on the calibration activations (method awq)."""

    # judge the q/k/v and gate/up scales by the output of the attention block / MLP they sit in
    # (block, as AutoAWQ does), or by the linears' own outputs (linear: faster)
    objective: Literal["block", "linear"] = "block"
    # after scaling, the codes come from GPTQ on the scaled weights under the full calibration Hessian (gptq:
    # the two combined, as the AWQ paper shows they compose; the gptq settings apply) or from a clip
    # search and rounding (clip, the paper's AWQ)
    codes: Literal["clip", "gptq"] = "gptq"


@dataclass(frozen=True)
class W8A8Config:
    """INT8 weights and activations (method w8a8, CPU provider)."""

    # dynamic (ONNX Runtime: one range per tensor, per run) | dynamic_per_token (one scale per token,
    # as vLLM runs it) | static (one symmetric scale per linear input, calibrated: clipped max |x|)
    activations: Literal["dynamic", "dynamic_per_token", "static"] = "dynamic"
    smoothquant: float | str = 0.0  # SmoothQuant strength alpha in (0, 1), or auto (searched per layer); 0 = off
    # rotate down_proj's inputs by a 128-wide block Hadamard in the graph, its weights to match (QuaRot);
    # our graphs only: activations static or dynamic_per_token
    hadamard: bool = False

    def __post_init__(self):
        if self.smoothquant != "auto" and not (isinstance(self.smoothquant, float) and 0 <= self.smoothquant < 1):
            raise RecipeError(
                f"smoothquant: {self.smoothquant!r} must be in [0, 1) or auto (0 = off, 0.5 is usual, "
                "auto searches alpha per layer on the calibration data)"
            )
        if self.hadamard and self.activations == "dynamic":
            raise RecipeError(
                "hadamard: rotates down_proj's inputs in our W8A8 graphs only; use it with activations: static "
                "or dynamic_per_token"
            )


def _check_group(key: str, size: int, usual: str) -> None:
    if size < 16 or size & (size - 1):
        raise RecipeError(f"{key}: {size} is not a power of two >= 16, which MatMulNBits requires (use {usual})")


@dataclass(frozen=True)
class QuantizeConfig:
    """Weight-only quantization of the decoder's linear layers (and optionally the LM head).

    `ignore` and `overrides` are regular expressions searched in module names such as
    `model.layers.3.mlp.down_proj`; ignored layers stay float and are listed in the manifest.
    """

    # rtn | gptq | awq (weight-only, MatMulNBits) | w8a8 (int8 weights and activations, CPU). awq is the default: its
    # scaling with GPTQ's codes (awq.codes: gptq) halves either one's loss on SmolLM2 (docs/notes/2026-12-06-quantization-on-smollm2.md)
    method: Literal["rtn", "gptq", "awq", "w8a8"] = "awq"
    bits: int = 4  # 4 or 8
    group_size: int = 128  # weights per scale (a power of two >= 16)
    symmetric: bool = False  # symmetric groups (no zero point) or asymmetric
    # asymmetric 4-bit zero points: int (the grid starts at a multiple of the scale) or float (the grid spans each
    # block's exact range, as llama.cpp's Q4_1; run through a small correction matmul per layer); 8-bit layers use int
    zero_point: Literal["int", "float"] = "int"
    ignore: tuple[str, ...] = ()  # regular expressions of module names kept float
    overrides: dict[str, int] = field(default_factory=dict)  # regex -> bits (4 or 8) for matching layers
    lm_head: HeadPrecision = "float"  # the LM head: float, int8 or int4
    embedding: HeadPrecision = "float"  # round-to-nearest; shares the LM head's codes when tied and equal)
    # group size of the quantized LM head and embedding (null: group_size): the head is the most sensitive layer,
    # and finer groups there (16) cost SmolLM2 4 MB, which a size budget then takes from its INT8 layers
    head_group_size: int | None = None
    gptq: GptqConfig = field(default_factory=GptqConfig)  # GPTQ's settings (method gptq, and awq with awq.codes: gptq)
    awq: AwqConfig = field(default_factory=AwqConfig)  # AWQ's settings (method awq)
    w8a8: W8A8Config = field(default_factory=W8A8Config)  # W8A8's settings (method w8a8)
    search_tokens: int = 2048  # AWQ, SmoothQuant: calibration tokens per layer input used by the searches
    # GPTQ, AWQ: once the codes are chosen, refit each row's group scales by least squares on the layer's output
    # error on the calibration inputs, all of a row's groups at once (codes re-rounded in turn); false keeps the
    # papers' algorithms as they are
    refit_scales: bool = True
    # GPTQ, AWQ, with refit_scales: between scale refits, move each code by cyclic coordinate descent on the same
    # output error (QuantEase-style), instead of only re-rounding codes to the nearest grid point
    code_descent: bool = False
    provider: Literal["cpu", "cuda"] = "cpu"  # the execution provider the artifact is for
    budget: BudgetConfig | None = None  # mixed precision chosen by measured sensitivity (INT4 bits only)
    calibration: CalibrationConfig = field(
        default_factory=CalibrationConfig
    )  # the text the calibrated methods learn from
    version: int = 12
    # keys of an older schema -> where they live now
    MOVED: ClassVar[dict[str, str]] = {
        "damp": "gptq.damp",
        "act_order": "gptq.act_order",
        "mse_clip": "gptq.mse_clip",
        "awq_objective": "awq.objective",
        "awq_codes": "awq.codes",
        "activations": "w8a8.activations",
        "smoothquant": "w8a8.smoothquant",
        "hadamard": "w8a8.hadamard",
    }

    @property
    def head_groups(self) -> int:
        """The group size of the LM head's and the embedding's codes."""
        return self.head_group_size or self.group_size

    def __post_init__(self):
        _check_bits("bits", self.bits)
        _check_group("group_size", self.group_size, "32, 64 or 128")
        if self.head_group_size is not None:
            _check_group("head_group_size", self.head_group_size, "16, 32 or 64")
        if self.head_group_size is not None and (
            self.method == "w8a8" or (self.lm_head == "float" and self.embedding == "float")
        ):
            raise RecipeError(
                "head_group_size: sets the groups of a weight-only quantized lm_head or embedding; "
                "set lm_head or embedding to int4/int8 (method rtn, gptq or awq), or remove it"
            )
        for pattern in (*self.ignore, *self.overrides):
            try:
                re.compile(pattern)
            except re.error as e:
                raise RecipeError(f"ignore/overrides: '{pattern}' is not a valid regular expression ({e})") from None
        for pattern, bits in self.overrides.items():
            _check_bits(f"overrides.{pattern}", bits)
        head_hit = next((p for p in self.ignore if re.search(p, "lm_head")), None)
        if head_hit is not None and self.lm_head != "float":
            raise RecipeError(
                f"ignore: '{head_hit}' matches lm_head, which lm_head: {self.lm_head} quantizes; "
                "set lm_head: float to keep it float, or narrow the pattern (e.g. '^model\\.layers\\.')"
            )
        for section, methods in (("gptq", ("gptq", "awq")), ("awq", ("awq",)), ("w8a8", ("w8a8",))):
            if getattr(self, section) != type(getattr(self, section))() and self.method not in methods:
                raise RecipeError(
                    f"{section}: settings for method {' or '.join(methods)}, but method is {self.method}; "
                    f"remove them or set method"
                )
        if self.method in ("gptq", "awq") and self.calibration.num_samples < 8:
            raise RecipeError(
                f"calibration.num_samples: {self.calibration.num_samples} is too few for {self.method.upper()}; "
                "use at least 8 (128 is usual)"
            )
        if self.method == "w8a8" and (self.lm_head == "int4" or self.embedding != "float"):
            raise RecipeError(
                "lm_head/embedding: w8a8 quantizes the LM head to W8A8 with lm_head: int8 (or keeps it "
                "float) and keeps the embedding float; int4 and a quantized embedding are for rtn, gptq, awq"
            )
        if self.code_descent and not (self.refit_scales and self.method in ("gptq", "awq")):
            raise RecipeError(
                "code_descent: runs inside the refit of GPTQ's or AWQ's scales; use it with method gptq or awq "
                f"and refit_scales: true (got method {self.method}, refit_scales {str(self.refit_scales).lower()})"
            )
        if self.zero_point == "float" and (self.symmetric or self.method == "w8a8"):
            raise RecipeError(
                "zero_point: float is for asymmetric weight-only blocks; use it with symmetric: false and "
                f"method rtn, gptq or awq (got symmetric: {str(self.symmetric).lower()}, method {self.method})"
            )
        if self.method == "w8a8" and self.provider == "cuda":
            raise RecipeError(
                "method: w8a8 targets the CPU provider only: the CUDA provider has no kernels for its integer "
                "ops, so they would fall back to the CPU; use a weight-only method (rtn, gptq, awq) for cuda"
            )
        if self.budget is not None and (self.bits != 4 or self.method == "w8a8"):
            raise RecipeError(
                "budget: chooses INT8 for some layers of an INT4 plan; use it with bits: 4 and a weight-only method"
            )
        if self.search_tokens < 64:
            raise RecipeError(f"search_tokens: {self.search_tokens} is too few; use at least 64 (2048 is the default)")


def _check_bits(key: str, bits: int) -> None:
    if bits not in (4, 8):
        raise RecipeError(f"{key}: {bits} bits is not supported; use 4 or 8")


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18  # the ONNX opset of the graphs (18 is the exporter's lowest)
    external_data: bool = True  # weights in model.onnx.data beside the graph (relative path)
    parity_tokens: int = 16  # tokens of the export-time parity check against PyTorch
    # MatMulNBits compute: 0 = float like the weights' dequantized matmul, 4 = int8 (faster on CPU),
    # auto = whichever of the two decodes faster on this machine's CPU (measured by the export, in its manifest)
    accuracy_level: Literal[0, 1, 2, 3, 4, "auto"] = 0
    # the same for 8-bit layers only (None: as accuracy_level)
    int8_accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    fused: bool = True  # also write fused/: GroupQueryAttention, fused norms, in-place KV cache (ONNX Runtime only)
    # the fused graph's weights and KV cache: float32, or float16 (what CUDA's GroupQueryAttention needs)
    dtype: Literal["float32", "float16"] = "float32"
    # the fused graph's KV cache: float (as dtype) or int8 (static per-channel scales; CPU provider)
    kv_cache: Literal["float", "int8"] = "float"
    kv_calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(num_samples=16, batch_size=4)
    )  # the text the int8 KV cache's scales are measured on (kv_cache: int8)
    # formats written: onnx (always), gguf (llama.cpp, in gguf/), hf-quantized (compressed-tensors for vLLM, in hf-quantized/)
    targets: tuple[ExportTarget, ...] = ("onnx",)
    # hf-quantized's float tensors and scales: auto (as the model), float32, bfloat16, float16
    hf_quantized_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    version: int = 15

    def __post_init__(self):
        if self.accuracy_level == "auto" and self.dtype == "float16":
            raise RecipeError(
                "accuracy_level: auto times the CPU's arithmetic; a float16 graph is for CUDA, so set 0 or 4 explicitly"
            )
        if self.dtype == "float16" and not self.fused:
            raise RecipeError(
                "dtype: float16 applies to the fused graph (the portable one stays float32); set fused: true"
            )
        if self.kv_cache == "int8" and (not self.fused or self.dtype != "float32"):
            raise RecipeError(
                "kv_cache: int8 is built for the fused graph in float32 (ONNX Runtime's CPU GroupQueryAttention); "
                "set fused: true and dtype: float32, or kv_cache: float"
            )
        if not 18 <= self.opset <= 21:
            raise RecipeError(f"opset: {self.opset} is not supported; use 18..21 (18 is the default)")
        if self.hf_quantized_dtype != "auto" and "hf-quantized" not in self.targets:
            raise RecipeError("hf_quantized_dtype: applies to the hf-quantized target, which targets does not list")
        if "onnx" not in self.targets:
            raise RecipeError("targets: must include onnx (the runner and the validate stage read it)")
        if self.parity_tokens < 2:
            raise RecipeError(f"parity_tokens: {self.parity_tokens} is too small; use at least 2")


DEFAULT_PROMPTS = (
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The most important rule of machine learning is",
    "To make a cup of tea, first",
)


@dataclass(frozen=True)
class ChatEvalConfig:
    """Chat checks: the artifact and the baseline answer the chat set greedily (`max_new_tokens` each, in
    batches of `batch_size`, under `system`, none = the chat template's default). `prompts`: a JSONL file
    ({"prompt": ..., "answers": [...]}); none = the built-in set (calibration/chat_set.py)."""

    prompts: TextSourceConfig | None = None  # a JSON-lines file of {prompt, answers}; none: the built-in set
    max_new_tokens: int = 64  # tokens per reply
    batch_size: int = 16  # prompts answered together
    system: str | None = None  # system message; none = the chat template's default

    def __post_init__(self):
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key}: must be a positive integer, got {getattr(self, key)}")
        if self.prompts is not None and not self.prompts.source.endswith(".jsonl"):
            raise RecipeError(
                f"prompts: '{self.prompts.source}' is not a .jsonl file; give a local JSONL file of "
                '{"prompt": ..., "answers": [...]} lines, or leave it out for the built-in set'
            )


@dataclass(frozen=True)
class ValidateConfig:
    """Accuracy of the exported artifact against the unoptimized PyTorch model.

    Perplexity protocol: the eval text is tokenized once (no BOS unless `add_bos`), cut into
    windows of `context_length` tokens every `stride` tokens, and the first `max_windows`
    windows are scored; with stride < context_length only the last `stride` tokens of a window
    are scored. Thresholds map a metric name to its limit (see validate.METRICS).
    """

    # one text, or several by name ({prose: {source: wikitext-2}, code: {source: python-code}}): each is scored
    # on its own, the first under the plain metric names too
    eval_data: TextSourceConfig | dict[str, TextSourceConfig] = field(
        default_factory=lambda: TextSourceConfig("wikitext-2", "test")
    )
    context_length: int = 512  # tokens per window
    stride: int | None = None  # None: equal to context_length (non-overlapping windows)
    max_windows: int = 40  # windows scored per text
    add_bos: bool = False  # start each window with the BOS token
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # prompts of the greedy-agreement checks
    max_new_tokens: int = 32  # greedy tokens per prompt
    # where the artifact runs: auto takes CUDA when onnxruntime offers it and the graph is float16
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    chat: ChatEvalConfig | None = None  # chat checks (`chat: {}` for the built-in set); none = skipped
    # metric (or metric@text) -> limit; a metric beyond its limit fails the run. Merged key by key over the default
    # gates, which follow the steps before validate (pipeline/stages/validate/gates.py: float parity after a plain
    # export, a limit on the perplexity change after quantize or distill); a metric set to null drops its default
    thresholds: dict[str, float | None] = field(default_factory=dict)
    default_gates: bool = True  # false: only `thresholds` gate (none given: every metric reported, none gates)
    version: int = 7

    @property
    def domains(self) -> dict[str, TextSourceConfig]:
        """The evaluation texts by name; one text is named after its source."""
        if isinstance(self.eval_data, dict):
            return dict(self.eval_data)
        return {
            Path(self.eval_data.source).stem
            if "." in Path(self.eval_data.source).name
            else self.eval_data.source: self.eval_data
        }

    def __post_init__(self):
        if self.stride is None:
            object.__setattr__(self, "stride", self.context_length)  # resolved before fingerprinting
        for name in ("context_length", "stride", "max_windows", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.stride > self.context_length:
            raise RecipeError(
                f"stride: {self.stride} is larger than context_length {self.context_length}; "
                "tokens between windows would never be scored"
            )
        if not self.prompts:
            raise RecipeError("prompts: needs at least one prompt")
        if isinstance(self.eval_data, dict):
            if not self.eval_data:
                raise RecipeError(
                    "eval_data: an empty mapping; give one text, or name each: {prose: {source: wikitext-2}}"
                )
            for domain in self.eval_data:
                if not DOMAIN_NAME.match(domain):
                    raise RecipeError(f"eval_data.{domain}: a domain's name is letters, digits, '_' or '-'")
        for key in self.thresholds:
            name, _, domain = key.partition("@")
            if name not in VALIDATE_METRICS:
                raise RecipeError(
                    f"thresholds.{key}: unknown metric{did_you_mean(name, VALIDATE_METRICS)}; "
                    f"known: {', '.join(VALIDATE_METRICS)}"
                )
            if domain and (name not in DOMAIN_METRICS or domain not in self.domains):
                raise RecipeError(
                    f"thresholds.{key}: a per-domain limit is one of {', '.join(DOMAIN_METRICS)} "
                    f"@ a domain eval_data names ({', '.join(self.domains) if len(self.domains) > 1 else 'it names one text'})"
                )
            if name in CHAT_METRICS and self.chat is None:
                raise RecipeError(
                    f"thresholds.{name}: measured by the chat checks, which are off; add `chat: {{}}` "
                    "(the built-in chat set) or drop the threshold"
                )
