"""Shared fixtures: tiny random-weight checkpoints (with a real BPE tokenizer and chat template),
tiny recipes, and one tiny end-to-end run reused by many tests. Right for speed, never for accuracy."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_GGUF = ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = (
    textwrap.dedent("""\
    The quick brown fox jumps over the lazy dog. A model that is smaller and faster is still useful
    when it stays accurate. The capital of France is Paris, and the capital of Italy is Rome.
    Once upon a time there was a small village by the sea where people told stories every night.
    def add(a, b): return a + b. Numbers like 1, 2, 3, 42 and 1000 appear in text as well.
    """)
    * 20
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


# settings a family needs away from their defaults for a test to see them (Granite's multipliers default to 1)
FAMILY_SETTINGS = {
    "granite": {
        "embedding_multiplier": 6.0,
        "attention_multiplier": 0.3,
        "residual_multiplier": 0.4,
        "logits_scaling": 4.0,
    },
    "smollm3": {"no_rope_layer_interval": 2, "pad_token_id": 0},  # layers 1, 3, ... without rotary
    # rotary on half of each 32-wide head (Phi-4-mini: on 96 of 128); GroupQueryAttention wants 8 | rotary_dim / 2
    "phi3": {"pad_token_id": 0, "partial_rotary_factor": 0.5, "num_attention_heads": 2, "num_key_value_heads": 1},
    # Gemma's heads are wider than hidden_size / heads; weights 5x the default's spread so that the soft caps bite
    "gemma": {"head_dim": 32, "tie_word_embeddings": True},
    "gemma2": {
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "initializer_range": 0.1,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
        "tie_word_embeddings": True,
    },
    # layers alternate sliding (base 1,000) and full (base 50,000, linear scaling)
    "gemma3_text": {
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "rope_local_base_freq": 1000.0,
        "rope_theta": 50000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "tie_word_embeddings": True,
    },
}


def longrope(original: int) -> dict:
    """Config settings for longrope (Phi-3.5, Phi-4-mini) on the tiny Phi-3's 8 rotary frequencies: short and
    long factors far apart, the long ones taken past `original` positions."""
    return {
        "original_max_position_embeddings": original,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)],
        },
    }


def make_checkpoint(
    folder: Path,
    family: str = "llama",
    seed: int = 0,
    layers: int = 2,
    dtype: str = "float32",
    max_positions: int = 256,
    settings: dict | None = None,
) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    base = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": family == "qwen2",
    }
    config = AutoConfig.for_model(family, **{**base, **FAMILY_SETTINGS.get(family, {}), **(settings or {})})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_recipe(
    folder: Path, model: Path, text: Path, name: str = "tiny", extra_validate: str = "", export: str = "{opset: 18}"
) -> Path:
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: {name}
        model:
          source: {model}
        stages:
          - export: {export}
          - validate:
              eval_data: {{source: {text}}}
              context_length: 64
              max_windows: 4
              max_new_tokens: 8
              prompts: ["The capital of France", "Once upon a time there was a", "def add(a, b):", "42"]
        """)
        + textwrap.indent(extra_validate, " " * 6)
    )
    return recipe


def write_targets_recipe(
    folder: Path, model: Path, text: Path, quantize: str | None, targets: str, thresholds: str = "{}"
) -> Path:
    """quantize (when given) -> export to `targets` -> validate with `thresholds`: the export-target tests' recipe."""
    recipe = folder / "targets.yaml"
    quantize_stage = f"  - quantize: {quantize}\n" if quantize else ""
    recipe.write_text(
        textwrap.dedent("""\
        name: tiny-targets
        model: {{source: {model}}}
        stages:
        {quantize}  - export: {{targets: {targets}}}
          - validate:
              eval_data: {{source: {text}}}
              context_length: 64
              max_windows: 3
              max_new_tokens: 8
              prompts: ["The capital of France", "def add(a, b):"]
              thresholds: {thresholds}
              default_gates: false
        """).format(model=model, text=text, targets=targets, thresholds=thresholds, quantize=quantize_stage)
    )
    return recipe


# CI's scale for the shipped recipes: every stage as shipped, but validate scores the first 8 windows
# (4,088 tokens) instead of 40, and calibrated stages see 32 blocks instead of 128. The README's figures
# come from the full recipes (benchmarks/); here the gates must hold on the smaller sample.
CI_WINDOWS = "validate.max_windows=8"
CI_CALIBRATION = "quantize.calibration.num_samples=32"


def run_reference_recipe(name: str, tmp_path_factory, overrides: tuple[str, ...] = (CI_WINDOWS,)) -> Path:
    """Run a shipped recipe on the real reference model into a fresh work folder (slow tier)."""
    from pipeline import run

    if not REFERENCE_GGUF.exists():
        pytest.fail(f"{REFERENCE_GGUF} is missing: run `make model`")
    return run(ROOT / "recipes" / name, workdir=reference_workdir(tmp_path_factory), overrides=overrides)


def reference_workdir(tmp_path_factory) -> Path:
    """One workdir for every reference run of the session: their common model step is built once and
    linked into the others (pipeline/steps.py, `_verified_twin`)."""
    folder = tmp_path_factory.getbasetemp() / "reference-runs"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session", autouse=True)
def own_tuning_cache(tmp_path_factory):
    """Tests never read the tunings `optimize tune` left in this machine's cache (subprocesses inherit it)."""
    before = os.environ.get("LLM_OPTIMIZE_TUNING_DIR")
    os.environ["LLM_OPTIMIZE_TUNING_DIR"] = str(tmp_path_factory.mktemp("tuning-cache"))
    yield
    if before is None:
        os.environ.pop("LLM_OPTIMIZE_TUNING_DIR", None)
    else:
        os.environ["LLM_OPTIMIZE_TUNING_DIR"] = before


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture
def ort_causal_lm():
    """optimum's ORTModelForCausalLM. optimum-onnx 0.1, the newest, installs only beside transformers<4.58:
    on the current stack these tests skip, and `make test-old-stack` (part of `make test`) runs them."""
    reason = "optimum-onnx needs transformers<4.58: `make test-old-stack` runs this"
    return pytest.importorskip("optimum.onnxruntime", reason=reason).ORTModelForCausalLM


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama, eval_text) -> Path:
    """One end-to-end run of the tiny recipe (model -> export -> validate); returns its run folder."""
    from pipeline import run

    work = tmp_path_factory.mktemp("work")
    recipe = write_recipe(work, tiny_llama, eval_text)
    return run(recipe, workdir=work / "artifacts")


@pytest.fixture(scope="session")
def tiny_export(tiny_run) -> Path:
    from runtime import find_model_folder

    return find_model_folder(tiny_run)


@pytest.fixture(scope="session")
def tiny_export_int8_kv(tmp_path_factory, tiny_llama, eval_text) -> Path:
    """The tiny recipe exported with an int8 KV cache (scales calibrated on the tiny corpus)."""
    from pipeline import run
    from runtime import find_model_folder

    work = tmp_path_factory.mktemp("work-int8-kv")
    export = (
        "{opset: 18, kv_cache: int8, kv_calibration: {data: {source: %s}, num_samples: 4, sequence_length: 32}}"
        % eval_text
    )
    gates = "thresholds: {top1_agreement: 0.9, greedy_token_agreement: 0.8}\ndefault_gates: false"  # near-ties flip
    return find_model_folder(
        run(write_recipe(work, tiny_llama, eval_text, "tiny-int8-kv", gates, export=export), workdir=work / "artifacts")
    )


FAULTY_SEED = 13


@pytest.fixture()
def sampling_fault(monkeypatch) -> int:
    """The server's sampler raises for requests seeded FAULTY_SEED (an internal error in one request)."""
    from runtime.serve import engine

    real_sample = engine.sample

    def faulty(logits, params, rng):
        if params.seed == FAULTY_SEED:
            raise ValueError("injected fault")
        return real_sample(logits, params, rng)

    monkeypatch.setattr(engine, "sample", faulty)
    return FAULTY_SEED


def greedy_shortfall(gen, question: str, answer: str) -> float:
    """How far (in logits) the answer's least-preferred token falls below the best token at its position,
    scoring the answer after the question's chat prompt in one forward pass without a cache."""
    import numpy as np

    prompt = gen.tokenizer.encode_chat(question)
    tokens = gen.tokenizer.encode(answer, add_special_tokens=False)
    logits = gen.logits(prompt + tokens)[len(prompt) - 1 : -1]
    return float((logits.max(-1) - logits[np.arange(len(tokens)), tokens]).max())


def assert_graphs_match_torch(export_dir: Path, reference, lengths: tuple[int, ...], atol: float) -> None:
    """Both graphs' last-token prefill logits equal `reference`'s (a PyTorch model) on random prompts of
    each length: for positions the eval windows do not reach (longrope past its original length)."""
    import numpy as np
    import torch

    from runtime import Generator

    ids = np.random.default_rng(0).integers(0, reference.config.vocab_size, max(lengths))
    for graph in ("portable", "fused"):
        generator = Generator(export_dir, provider="cpu", graph=graph)
        for n in lengths:
            logits, _ = generator.prefill([ids[:n].tolist()], 64)
            with torch.no_grad():
                expected = reference(torch.tensor(ids[None, :n])).logits[0, -1].numpy()
            np.testing.assert_allclose(logits[0], expected, atol=atol, err_msg=f"{graph} graph, {n} tokens")
