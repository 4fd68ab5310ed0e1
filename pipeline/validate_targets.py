"""The export's other targets measured through their own engines, with the validate stage's protocol.

The same scored windows and the same prompts as the ONNX artifact: perplexity through the engine,
its gap to the ONNX artifact's, and greedy agreement with the baseline. A target whose engine is
not installed is reported as not validated, with the command that installs it; a threshold on its
metrics then fails as "not measured", never passes.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.formats.gguf import GGUF_FILE, GGUF_FOLDER

INSTALL = {"gguf": "pip install llama-cpp-python  (builds llama.cpp from source: needs a C++ compiler and cmake)"}


@dataclass
class ScoredWindow:
    inputs: np.ndarray  # token ids fed to the model (BOS included when the protocol adds one)
    first: int  # position whose logits predict the first scored token
    targets: np.ndarray  # the scored tokens
    onnx_top1: np.ndarray | None = None  # the ONNX artifact's argmax at the scored positions, once measured


def scored_window(ids: np.ndarray, begin: int, end: int, scored: int, bos: int | None) -> ScoredWindow:
    """The window ids[begin:end] (BOS first when given) whose last `scored` tokens are predicted."""
    window = ids[begin:end]
    inputs = np.concatenate([[bos], window]).astype(np.int64) if bos is not None else window
    offset = 1 if bos is not None else 0
    return ScoredWindow(inputs, offset + len(window) - scored - 1, window[len(window) - scored:])


def validate_targets(export_dir: Path, windows: list[ScoredWindow], prompts: list[list[int]],
                     greedy: dict[str, list[list[int]]], max_new_tokens: int, eos_ids: set[int], metrics: dict, log) -> dict:
    """Measure every non-ONNX target found in `export_dir`; adds its metrics and returns its report entry.
    `greedy` holds the baseline's and the ONNX runner's greedy tokens for `prompts`."""
    report = {}
    gguf_path = export_dir / GGUF_FOLDER / GGUF_FILE
    if gguf_path.is_file():
        report["gguf"] = _gguf(gguf_path, windows, prompts, greedy, max_new_tokens, eos_ids, metrics, log)
    return report


def _gguf(path: Path, windows, prompts, greedy, max_new_tokens, eos_ids, metrics, log) -> dict:
    try:
        llm = open_gguf(path, max(max((len(w.inputs) for w in windows), default=0),
                                  max((len(p) for p in prompts), default=0) + max_new_tokens))
    except ImportError:
        log(f"  gguf: NOT validated, llama-cpp-python is not installed ({INSTALL['gguf']})")
        return {"validated": False, "reason": "llama-cpp-python is not installed", "install": INSTALL["gguf"]}
    ppl, top1 = gguf_perplexity(llm, windows)
    tokens = [gguf_greedy(llm, ids, max_new_tokens, eos_ids) for ids in prompts]
    metrics["gguf_perplexity"] = ppl
    metrics["gguf_perplexity_vs_onnx_pct"] = abs(ppl - metrics["perplexity"]) / metrics["perplexity"] * 100
    if top1 is not None:
        metrics["gguf_onnx_top1_agreement"] = top1
    metrics["gguf_greedy_agreement"] = agreement(greedy["baseline"], tokens)
    metrics["gguf_onnx_greedy_agreement"] = agreement(greedy["onnx"], tokens)
    version = importlib.metadata.version("llama-cpp-python")
    log(f"  gguf through llama.cpp ({version}): perplexity {ppl:.4f} ({metrics['gguf_perplexity_vs_onnx_pct']:.3f} % "
        f"from the ONNX artifact's), next-token argmax equal to the ONNX artifact's at {top1 or float('nan'):.3f} of "
        f"the scored positions; greedy agreement {metrics['gguf_onnx_greedy_agreement']:.3f} with the ONNX runner, "
        f"{metrics['gguf_greedy_agreement']:.3f} with the baseline")
    return {"validated": True, "engine": f"llama-cpp-python {version}", "file": str(path), "perplexity": ppl,
            "scored_tokens": sum(len(w.targets) for w in windows)}


def open_gguf(path: Path, context: int):
    """llama.cpp on `path` with every position's logits kept (raises ImportError without llama-cpp-python)."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                 verbose=False, n_threads=os.cpu_count())


def gguf_perplexity(llm, windows: list[ScoredWindow]) -> tuple[float, float | None]:
    """Perplexity of the scored tokens of `windows`, each window run from an empty cache, and the
    fraction of scored positions where llama.cpp's argmax equals the ONNX artifact's (when known)."""
    nll, scored, same = 0.0, 0, 0
    for w in windows:
        llm.reset()
        llm.eval(w.inputs.tolist())
        logits = np.asarray(llm.scores[w.first: w.first + len(w.targets)], dtype=np.float64)  # [S, V]
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


def gguf_greedy(llm, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in eos_ids or len(out) >= max_new_tokens:
            break
        out.append(token)
    return out
