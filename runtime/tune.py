"""`optimize tune`: choose the runner's session settings by measuring them on the machine at hand.

For each candidate a fresh session of the artifact's runner graph prefills one prompt and decodes
`steps` tokens at `batch`; the decode step time decides. Threads are searched first, at the `all`
optimization level, over onnxruntime's own choice, 1, 2, 4 … and every usable core; then the three
optimization levels at the best thread count (on CUDA only the levels: the kernels run on the GPU).
Every candidate is measured in `rounds` passes, alternately forward and backward, and its median
kept, so that a machine which slows down during the search does not favour the first candidates.
A candidate replaces onnxruntime's defaults only when its median step is `margin` shorter, so noise
alone never moves a setting. The result goes to this machine's tuning cache (runtime.settings), where
every later Generator on this machine finds it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from runtime.generate import Generator, load_contract, runner_graph_folder
from runtime.machine import usable_cores
from runtime.session import OPTIMIZATION_LEVELS, choose_provider
from runtime.settings import SessionSettings, machine_facts, tuning_path

MARGIN = 0.03  # a candidate must beat the defaults' decode step by this fraction to be chosen


def thread_counts(cores: int) -> list[int]:
    """0 (onnxruntime's choice), then powers of two below `cores`, then `cores`."""
    counts, n = {cores}, 1
    while n < cores:
        counts.add(n)
        n *= 2
    return [0, *sorted(counts)]


def measure(
    folder: Path, settings: SessionSettings, provider: str, graph: str, batch: int, prompt_tokens: int, steps: int
) -> tuple[float, float]:
    """(prefill ms of one `prompt_tokens` prompt, decode ms per step at `batch`) in a fresh session."""
    gen = Generator(
        folder,
        provider=provider,
        threads=settings.threads,
        optimization=settings.optimization,
        graph=graph,
        verify_placement=False,
    )
    vocab = gen.contract.vocab_size
    prompt = [
        int(t) for t in np.arange(prompt_tokens) * 7919 % (vocab - 1) + 1
    ]  # any ids: speed does not depend on them
    gen.prefill([prompt], steps)  # warm-up
    started = time.perf_counter()
    gen.prefill([prompt], steps)
    prefill_ms = (time.perf_counter() - started) * 1000
    prompts = [prompt] * batch
    gen.generate(prompts, 4, ignore_eos=True)  # warm-up at this batch size
    result = gen.generate(prompts, steps + 1, ignore_eos=True)
    return prefill_ms, result.decode_seconds / result.decode_steps * 1000


def tune(
    folder: Path | str,
    provider: str = "auto",
    graph: str = "auto",
    batch: int = 1,
    prompt_tokens: int = 128,
    steps: int = 64,
    rounds: int = 3,
    margin: float = MARGIN,
    log: Callable[[str], None] = print,
    measure_fn: Callable[..., tuple[float, float]] = measure,
) -> dict:
    """Search the settings, write the tuning file, and return its content (path under "file")."""
    folder = Path(folder)
    provider = choose_provider(provider)
    flavour = load_contract(runner_graph_folder(folder, graph)).flavour
    timings: dict[SessionSettings, dict[str, list[float]]] = {}

    def run_pass(candidates: list[SessionSettings]) -> None:
        for turn in range(rounds):
            for settings in candidates if turn % 2 == 0 else candidates[::-1]:
                prefill_ms, decode_ms = measure_fn(folder, settings, provider, graph, batch, prompt_tokens, steps)
                times = timings.setdefault(settings, {"prefill_ms": [], "decode_ms": []})
                times["prefill_ms"].append(prefill_ms)
                times["decode_ms"].append(decode_ms)
                log(f"  {settings.describe():50s} prefill {prefill_ms:8.1f} ms   decode {decode_ms:7.2f} ms/step")

    def decode(settings: SessionSettings) -> float:
        return statistics.median(timings[settings]["decode_ms"])

    threads = thread_counts(usable_cores()) if provider == "cpu" else [0]
    if len(threads) > 1:
        log(f"threads at graph optimization all ({rounds} rounds):")
        run_pass([SessionSettings(t, "all") for t in threads])
    best_threads = min(threads, key=lambda t: decode(SessionSettings(t, "all"))) if len(threads) > 1 else threads[0]
    log(f"graph optimization levels at {SessionSettings(best_threads).describe_threads()} ({rounds} rounds):")
    run_pass([SessionSettings(best_threads, level) for level in OPTIMIZATION_LEVELS])
    default = SessionSettings()
    best = min(timings, key=decode)
    chosen = best if decode(best) < decode(default) * (1 - margin) else default
    result = {
        "machine": machine_facts(provider, flavour),
        "workload": {
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "decode_steps": steps,
            "rounds": rounds,
            "margin": margin,
        },
        "candidates": [
            {**asdict(s), "decode_ms_median": decode(s), "prefill_ms_median": statistics.median(t["prefill_ms"]), **t}
            for s, t in timings.items()
        ],
        "default": asdict(default),
        "chosen": asdict(chosen),
        "decode_speedup_vs_default": decode(default) / decode(chosen),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = tuning_path(folder, provider, flavour)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return {**result, "file": str(path)}
