"""The export's other targets measured through their own engines, with the validate stage's protocol.

The same scored windows and the same prompts as the ONNX artifact: perplexity through the engine,
its gap to the ONNX artifact's, how often its next-token argmax equals the ONNX artifact's, and
greedy agreement with the baseline and with the ONNX runner. Each engine only has to give the
logits of a token sequence and its own greedy continuation. A target whose engine is not
installed is reported as not validated, with the command that installs it; a threshold on its
metrics then fails as "not measured", never passes.

    target                   engine                                   metrics prefix
    onnx (genai_config.json) onnxruntime-genai                        genai_
    gguf                     llama.cpp (llama-cpp-python)             gguf_
    hf-quantized             transformers + compressed-tensors        hf_quantized_
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.formats.compressed_tensors import HF_QUANTIZED_FOLDER, checkpoint_dtype
from pipeline.formats.genai import GENAI_CONFIG
from pipeline.formats.gguf import GGUF_FILE, GGUF_FOLDER

INSTALL = {
    "genai": "pip install 'onnxruntime-genai>=0.18,<0.19'  (the bench extra; `make install`)",
    "gguf": "pip install llama-cpp-python  (builds llama.cpp from source: needs a C++ compiler and cmake; `make engines`)",
    "hf-quantized": "pip install 'compressed-tensors>=0.15,<0.18'  (`make engines`)",
}


@dataclass
class ScoredWindow:
    inputs: np.ndarray  # token ids fed to the model (BOS included when the protocol adds one)
    first: int  # position whose logits predict the first scored token
    targets: np.ndarray  # the scored tokens
    onnx_top1: np.ndarray | None = None  # the ONNX artifact's argmax at the scored positions, once measured


class TargetEngine(Protocol):
    label: str  # the engine and its version, for the report

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[T, V] next-token logits at every position of `ids`, from an empty cache."""

    def greedy(self, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
        """The engine's own greedy continuation, without the EOS that ends it."""


def scored_window(ids: np.ndarray, begin: int, end: int, scored: int, bos: int | None) -> ScoredWindow:
    """The window ids[begin:end] (BOS first when given) whose last `scored` tokens are predicted."""
    window = ids[begin:end]
    inputs = np.concatenate([[bos], window]).astype(np.int64) if bos is not None else window
    offset = 1 if bos is not None else 0
    return ScoredWindow(inputs, offset + len(window) - scored - 1, window[len(window) - scored :])


def validate_targets(
    export_dir: Path,
    windows: list[ScoredWindow],
    prompts: list[list[int]],
    greedy: dict[str, list[list[int]]],
    max_new_tokens: int,
    eos_ids: set[int],
    metrics: dict,
    log,
) -> dict:
    """Measure each target found in `export_dir` through its own engine (the ONNX graph through
    onnxruntime-genai, the GGUF, the compressed-tensors checkpoint); adds the metrics and returns the report entries.
    `greedy` holds the baseline's and the ONNX runner's greedy tokens for `prompts`."""
    context = max(
        max((len(w.inputs) for w in windows), default=0), max((len(p) for p in prompts), default=0) + max_new_tokens
    )
    found = {
        "genai": export_dir / GENAI_CONFIG,
        "gguf": export_dir / GGUF_FOLDER / GGUF_FILE,
        "hf-quantized": export_dir / HF_QUANTIZED_FOLDER,
    }
    opener = {
        "genai": lambda p: GenaiEngine(p.parent),
        "gguf": lambda p: LlamaCppEngine(p, context),
        "hf-quantized": TransformersEngine,
    }
    report = {}
    for target, path in found.items():
        if not path.exists():
            continue
        try:
            engine = opener[target](path)
        except ImportError as e:
            log(f"  {target}: NOT validated, its engine is not installed ({e}); {INSTALL[target]}")
            report[target] = {"validated": False, "reason": str(e), "install": INSTALL[target]}
            continue
        report[target] = measure(target, engine, windows, prompts, greedy, max_new_tokens, eos_ids, metrics, log)
        report[target]["path"] = str(path)
    return report


def measure(target: str, engine: TargetEngine, windows, prompts, greedy, max_new_tokens, eos_ids, metrics, log) -> dict:
    """Perplexity, top-1 agreement with the ONNX artifact and greedy agreement of one target, into `metrics`."""
    prefix = target.replace("-", "_") + "_"
    ppl, top1 = target_perplexity(engine, windows)
    tokens = [engine.greedy(ids, max_new_tokens, eos_ids) for ids in prompts]
    metrics[prefix + "perplexity"] = ppl
    metrics[prefix + "perplexity_vs_onnx_pct"] = gap = abs(ppl - metrics["perplexity"]) / metrics["perplexity"] * 100
    if top1 is not None:
        metrics[prefix + "onnx_top1_agreement"] = top1
    metrics[prefix + "greedy_agreement"] = agreement(greedy["baseline"], tokens)
    metrics[prefix + "onnx_greedy_agreement"] = agreement(greedy["onnx"], tokens)
    log(
        f"  {target} through {engine.label}: perplexity {ppl:.4f} ({gap:.3f} % from the ONNX artifact's), next-token "
        f"argmax equal to the ONNX artifact's at {top1 or float('nan'):.3f} of the scored positions; greedy agreement "
        f"{metrics[prefix + 'onnx_greedy_agreement']:.3f} with the ONNX runner, {metrics[prefix + 'greedy_agreement']:.3f} "
        "with the baseline"
    )
    return {
        "validated": True,
        "engine": engine.label,
        "perplexity": ppl,
        "scored_tokens": sum(len(w.targets) for w in windows),
    }


def target_perplexity(engine: TargetEngine, windows: list[ScoredWindow]) -> tuple[float, float | None]:
    """Perplexity of the scored tokens of `windows` through `engine`, and the fraction of scored
    positions where its argmax equals the ONNX artifact's (when known)."""
    nll, scored, same = 0.0, 0, 0
    for w in windows:
        logits = np.asarray(engine.logits(w.inputs)[w.first : w.first + len(w.targets)], dtype=np.float64)  # [S, V]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(w.targets)), w.targets].sum())
        scored += len(w.targets)
        if w.onnx_top1 is not None:
            same += int((logp.argmax(-1) == w.onnx_top1).sum())
    known = all(w.onnx_top1 is not None for w in windows)
    return math.exp(nll / scored), (same / scored if known else None)


def agreement(expected: list[list[int]], got: list[list[int]]) -> float:
    """Fraction of positions (over the longer of each pair) where both sequences hold the same token."""
    same = sum(sum(a == b for a, b in zip(e, g)) for e, g in zip(expected, got))
    total = sum(max(len(e), len(g)) for e, g in zip(expected, got))
    return same / total if total else 1.0


def until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """`tokens` up to, not including, the first end token."""
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))]


class LlamaCppEngine:
    """A GGUF file in llama.cpp, every position's logits kept."""

    def __init__(self, path: Path, context: int):
        from llama_cpp import Llama  # ImportError without llama-cpp-python

        self.llm = Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=context,
            n_ubatch=context,
            logits_all=True,
            verbose=False,
            n_threads=os.cpu_count(),
        )
        self.label = f"llama.cpp (llama-cpp-python {importlib.metadata.version('llama-cpp-python')})"

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids.tolist())
        return self.llm.scores[: len(ids)]

    def greedy(self, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
        out: list[int] = []
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in eos_ids or len(out) >= max_new_tokens:
                break
            out.append(token)
        return out


class TransformersEngine:
    """A compressed-tensors checkpoint loaded by transformers, the way vLLM's users check it on a CPU:
    in the checkpoint's own dtype (transformers would pick float16 for compressed-tensors otherwise)."""

    def __init__(self, folder: Path):
        import compressed_tensors  # noqa: F401  (ImportError when absent: transformers would only warn)
        import torch
        from transformers import AutoModelForCausalLM

        dtype = checkpoint_dtype(json.loads((folder / "config.json").read_text()))
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.label = (
            f"transformers {importlib.metadata.version('transformers')} + compressed-tensors "
            f"{importlib.metadata.version('compressed-tensors')}"
        )

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(ids[None])).logits[0].float().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
        with self.torch.no_grad():
            prompt = self.torch.tensor([ids])
            out = self.model.generate(
                prompt,
                attention_mask=self.torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(eos_ids),
                pad_token_id=min(eos_ids),
            )
        return until_eos(out[0, len(ids) :].tolist(), eos_ids)


class GenaiEngine:
    """onnxruntime-genai on the export folder's genai_config.json: its own generator loop over our portable graph."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og  # ImportError without onnxruntime-genai

        self.og = og
        self.model = og.Model(str(folder))
        self.label = f"onnxruntime-genai {importlib.metadata.version('onnxruntime-genai')}"

    def logits(self, ids: np.ndarray) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))
        return generator.get_output("logits")[0]

    def greedy(self, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return until_eos([int(t) for t in generator.get_sequence(0)[len(ids) :]], eos_ids)
