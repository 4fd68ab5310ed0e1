"""Our runner on the bench's work: load time, time to first token, decode speed per batch size,
time outside session.run, memory over a long generation, and the memory-bandwidth bound."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from pipeline.bench.system import gpu_memory_used_mb, read_bandwidth_gbs, rss_bytes
from pipeline.bench.workload import Workload, warm_up_gpu
from runtime import Generator


def measure_ours(
    folder: Path,
    work: Workload,
    provider: str = "auto",
    threads: int = 0,
    graph: str = "auto",
    log=print,
    cuda_graph: bool | None = None,
) -> dict:
    gpu_before = gpu_memory_used_mb()
    started = time.perf_counter()
    gen = Generator(folder, provider=provider, threads=threads, graph=graph, cuda_graph=cuda_graph)
    load_s = time.perf_counter() - started
    on_gpu = gen.provider != "CPUExecutionProvider"
    log(
        f"  ours: {gen.flavour} graph ({gen.contract.dtype}, KV cache {gen.describe_kv()}) on {gen.provider}{', CUDA graphs' if gen.cuda_graph else ''}, "
        f"loaded in {load_s:.2f}s; {gen.describe_settings()}"
    )
    result = {
        "engine": "ours",
        "graph": gen.flavour,
        "provider": gen.provider,
        "load_s": load_s,
        "session_settings": {**asdict(gen.settings), "tuning_file": str(gen.tuning_file) if gen.tuning_file else None},
        "dtype": gen.contract.dtype,
        "kv_cache_dtype": gen.contract.kv_dtype,
        "float_prefill": gen.float_prefill is not None,
        "cuda_graph": gen.cuda_graph,
        "weights": gen.contract.weights,
        "kv_bytes_per_token": gen.contract.kv_bytes_per_token(),
        "ttft_ms": {},
        "decode_ms_per_step": {},
        "decode_tok_s": {},
        "outside_run_pct": {},
    }
    if on_gpu:
        warm_up_gpu(lambda: gen.prefill([work.prompt(work.prompt_lengths[0])], work.new_tokens))
    for length in work.prompt_lengths:
        prompt = work.prompt(length)
        times = []
        for i in range(work.warmup + work.repeats):
            t = time.perf_counter()
            logits, _ = gen.prefill([prompt], work.new_tokens)
            int(np.argmax(logits[0]))
            if i >= work.warmup:
                times.append(time.perf_counter() - t)
        result["ttft_ms"][length] = statistics.median(times) * 1000
        log(f"    TTFT {length:5d} tokens: {result['ttft_ms'][length]:8.1f} ms")
    for batch in work.batches:
        prompts = work.batch(batch)
        gen.generate(prompts, 4, ignore_eos=True)  # warm-up at this batch size
        rates, steps_ms, outside = [], [], []
        for _ in range(work.repeats):
            res = gen.generate(prompts, work.new_tokens, ignore_eos=True)
            rates.append(batch * res.decode_steps / res.decode_seconds)
            steps_ms.append(res.decode_seconds / res.decode_steps * 1000)
            outside.append((1 - res.decode_session_seconds / res.decode_seconds) * 100)
        result["decode_tok_s"][batch] = statistics.median(rates)
        result["decode_ms_per_step"][batch] = statistics.median(steps_ms)
        result["outside_run_pct"][batch] = statistics.median(outside)
        log(
            f"    decode batch {batch}: {result['decode_tok_s'][batch]:7.1f} tok/s, "
            f"{result['decode_ms_per_step'][batch]:.2f} ms/step, {result['outside_run_pct'][batch]:.1f} % outside session.run"
        )
    result.update(_memory_over_long_generation(gen, work))
    if on_gpu and gpu_before is not None:  # the process's CUDA context, weights, KV buffers and ORT's arena
        result["gpu_memory_mb"] = gpu_memory_used_mb() - gpu_before
    result.update(_bandwidth_bound(gen, result["decode_tok_s"].get(1), threads, "cuda" if on_gpu else "cpu"))
    return result


def _memory_over_long_generation(gen: Generator, work: Workload) -> dict:
    """RSS after the KV buffer exists (step 16) and at the end of a `long_tokens` generation."""
    steps, rss = [0], {}

    def on_token(_row: int, _token: int) -> None:
        steps[0] += 1
        if steps[0] in (16, work.long_tokens):
            rss[steps[0]] = rss_bytes()

    gen.generate([work.prompt(work.decode_prompt)], work.long_tokens, ignore_eos=True, on_token=on_token)
    first, last = rss.get(16, 0), rss.get(work.long_tokens, 0)
    return {
        "long_generation_tokens": work.long_tokens,
        "rss_after_warmup_mb": first / 2**20,
        "rss_end_mb": last / 2**20,
        "rss_growth_mb": (last - first) / 2**20,
        "peak_rss_mb": rss_bytes(peak=True) / 2**20,
    }


def weight_bytes_read_per_token(model: Path) -> int:
    """Bytes of the initializers a decode step reads in full: all but those only gathered from
    (an embedding table is read one row per token)."""
    graph = onnx.load(str(model), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add(node.op_type if i == 0 else "other")
    total = 0
    for t in graph.initializer:
        if readers.get(t.name) == {"Gather"}:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def _bandwidth_bound(gen: Generator, decode_tok_s: float | None, threads: int, device: str) -> dict:
    """Decode reads every weight once per token: bytes per token over measured bandwidth bounds tok/s."""
    folder = gen.folder / "fused" if gen.flavour == "fused" else gen.folder
    weight_bytes = weight_bytes_read_per_token(folder / gen.contract.model_file)
    bandwidth = read_bandwidth_gbs(threads, megabytes=2048 if device == "cuda" else 512, provider=device)
    bound = bandwidth * 1e9 / weight_bytes
    return {
        "weight_bytes": weight_bytes,
        "read_bandwidth_gbs": bandwidth,
        "bandwidth_bound_tok_s": bound,
        "bandwidth_bound_fraction": (decode_tok_s or 0.0) / bound,
    }
