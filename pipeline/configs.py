"""Typed, frozen recipe sections. Every default of the recipe lives here and nowhere else.

Each stage config carries a `version`: bump it when the stage's output for the same settings
changes, so cached artifacts built by the old code are rebuilt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import RecipeError, did_you_mean

# Metrics the validate stage computes, and which side of the threshold passes.
VALIDATE_METRICS = {
    "perplexity_delta_pct": "max",  # (ppl_onnx - ppl_torch) / ppl_torch * 100
    "perplexity": "max",  # the artifact's own perplexity
    "top1_agreement": "min",  # teacher-forced next-token argmax agreement on the eval windows
    "kl_divergence": "max",  # mean KL(torch || onnx) of next-token distributions on the eval windows
    "greedy_token_agreement": "min",  # greedy tokens equal to the baseline's, over the prompt set
    "batch_greedy_agreement": "min",  # runner greedy batched (left padding) vs. one prompt at a time
    "decode_logits_max_abs_diff": "max",  # KV-cache decode steps vs. full recompute in PyTorch
    "window_logits_max_abs_diff": "max",  # prefill logits on the eval windows vs. PyTorch
}


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from: a hub id, a local HF checkpoint directory, or a .gguf file."""

    source: str
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load *.bin / *.pt checkpoints; off by default (arbitrary code on load)
    eos_tokens: tuple[str, ...] = ()  # extra end tokens; end-of-turn tokens of the chat template are added anyway
    version: int = 1


@dataclass(frozen=True)
class TextSourceConfig:
    """A text corpus: a built-in name (wikitext-2, tinyshakespeare), a local text file, or a hub dataset."""

    source: str
    split: str = "test"
    hub_config: str | None = None  # the hub dataset's configuration name, e.g. wikitext-2-v1
    text_field: str = "text"


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17
    external_data: bool = True  # weights in model.onnx.data beside the graph (relative path)
    parity_tokens: int = 16  # tokens of the export-time parity check against PyTorch
    version: int = 1

    def __post_init__(self):
        if not 14 <= self.opset <= 21:
            raise RecipeError(f"opset: {self.opset} is not supported; use 14..21 (17 is the default)")
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
class ValidateConfig:
    """Accuracy of the exported artifact against the unoptimized PyTorch model.

    Perplexity protocol: the eval text is tokenized once (no BOS unless `add_bos`), cut into
    windows of `context_length` tokens every `stride` tokens, and the first `max_windows`
    windows are scored; with stride < context_length only the last `stride` tokens of a window
    are scored. Thresholds map a metric name to its limit (see validate.METRICS).
    """

    eval_data: TextSourceConfig = field(default_factory=lambda: TextSourceConfig("wikitext-2", "test"))
    context_length: int = 512
    stride: int | None = None  # None: equal to context_length (non-overlapping windows)
    max_windows: int = 40
    add_bos: bool = False
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 32
    provider: str = "auto"  # auto | cpu | cuda
    thresholds: dict[str, float] = field(
        default_factory=lambda: {
            "perplexity_delta_pct": 0.1,
            "greedy_token_agreement": 1.0,
            "batch_greedy_agreement": 1.0,
            "top1_agreement": 0.99,
            "decode_logits_max_abs_diff": 1e-2,
        }
    )
    version: int = 1

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
        for name in self.thresholds:
            if name not in VALIDATE_METRICS:
                raise RecipeError(
                    f"thresholds.{name}: unknown metric{did_you_mean(name, VALIDATE_METRICS)}; "
                    f"known: {', '.join(VALIDATE_METRICS)}"
                )
        if self.provider not in ("auto", "cpu", "cuda"):
            raise RecipeError(f"provider: '{self.provider}' is not one of auto, cpu, cuda")
