"""The CUDA path on a GPU machine, in one run: `make gpu-check` (or `python -m benchmarks.checks.gpu_check RUN`).

Checks, each recorded pass/fail in gpu_check.json (the exit status is 1 when a hard check fails):
  provider     the session runs on CUDAExecutionProvider and no heavy node fell back to the CPU
  kv_on_device the KV buffers live in GPU memory, keep their addresses across generations, and
               are written in place (past and present are one buffer)
  cuda_vs_cpu  the same artifact on CUDA and on the CPU: prefill logits and greedy tokens
  cuda_graph   decode captured as a CUDA graph and replayed gives exactly the tokens of plain decode
  batch        a ragged batch decoded together against each prompt alone (greedy, on CUDA)
Float16 kernels differ between the providers and between batch shapes, so `cuda_vs_cpu` and
`batch` report agreement and are hard checks only at their first tokens; `cuda_graph` must match
exactly (same kernels, same shapes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from runtime import Generator, find_model_folder

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers.",
)
NEW_TOKENS = 48
HARD_PREFIX = 8  # tokens that must agree across providers and batch shapes


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, int]:
    """Fraction of positions that agree before the first divergence, and the shortest common prefix."""
    prefixes = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
    total = sum(max(len(x), len(y)) for x, y in zip(a, b))
    return sum(prefixes) / max(total, 1), min(prefixes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="a run folder or export step (its fused graph should be float16)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = parser.parse_args()
    import onnxruntime as ort

    folder = find_model_folder(args.artifact)
    report: dict = {
        "artifact": str(folder),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "checks": {},
    }
    checks = report["checks"]

    def record(name: str, ok: bool, hard: bool = True, **facts) -> None:
        checks[name] = {"ok": bool(ok), "hard": hard, **facts}
        print(f"[{'PASS' if ok else 'FAIL' if hard else 'NOTE'}] {name}: {json.dumps(facts, default=str)}", flush=True)

    started = time.perf_counter()
    gpu = Generator(folder, provider="cuda", cuda_graph=False)  # fails by name if a heavy node left the GPU
    record(
        "provider",
        gpu.provider == "CUDAExecutionProvider" and not gpu.fallback_nodes,
        provider=gpu.provider,
        fallback_nodes=gpu.fallback_nodes,
        graph=gpu.flavour,
        dtype=gpu.contract.dtype,
        load_s=round(time.perf_counter() - started, 2),
    )
    prompts = [gpu.tokenizer.encode_chat(p) for p in PROMPTS]

    tokens_gpu = gpu.generate(prompts, NEW_TOKENS, ignore_eos=True).tokens
    cache = gpu.graph._cache
    pointers = {n: v.data_ptr() for n, v in cache.values.items()}
    devices = {v.device_name() for v in cache.values.values()}
    gpu.generate(prompts, NEW_TOKENS, ignore_eos=True)
    record(
        "kv_on_device",
        devices == {"cuda"}
        and gpu.graph._cache is cache
        and {n: v.data_ptr() for n, v in cache.values.items()} == pointers
        and cache.values["past_key_values.0.key"].data_ptr() == cache.values["present.0.key"].data_ptr(),
        devices=sorted(devices),
        kv_mib=round(cache.nbytes / 2**20, 2),
    )

    cpu = Generator(folder, provider="cpu")
    text_ids = gpu.tokenizer.encode(" ".join(PROMPTS) * 6, add_special_tokens=False)[:128]
    lg, lc = gpu.logits(text_ids), cpu.logits(text_ids)
    tokens_cpu = cpu.generate(prompts, NEW_TOKENS, ignore_eos=True).tokens
    rate, prefix = agreement(tokens_gpu, tokens_cpu)
    record(
        "cuda_vs_cpu",
        prefix >= HARD_PREFIX and float((lg.argmax(-1) == lc.argmax(-1)).mean()) >= 0.95,
        logits_max_abs_diff=float(np.abs(lg - lc).max()),
        prefill_argmax_agreement=float((lg.argmax(-1) == lc.argmax(-1)).mean()),
        greedy_agreement=round(rate, 3),
        shortest_common_prefix=prefix,
    )

    graphed = Generator(folder, provider="cuda", cuda_graph=True)
    first = graphed.generate(prompts, NEW_TOKENS, ignore_eos=True)  # captures, then replays
    again = graphed.generate(prompts, NEW_TOKENS, ignore_eos=True)  # the same cache: replays only
    plain = gpu.generate(prompts, NEW_TOKENS, ignore_eos=True)
    record(
        "cuda_graph",
        first.tokens == tokens_gpu == again.tokens,
        agreement=agreement(again.tokens, tokens_gpu)[0],
        decode_tok_s_plain=round(len(prompts) * plain.decode_tokens_per_second, 1),
        decode_tok_s_graph=round(len(prompts) * again.decode_tokens_per_second, 1),
    )

    single = [gpu.generate([p], NEW_TOKENS, ignore_eos=True).tokens[0] for p in prompts]
    rate, prefix = agreement(tokens_gpu, single)
    record("batch", prefix >= HARD_PREFIX, greedy_agreement=round(rate, 3), shortest_common_prefix=prefix)
    report["sample"] = gpu.tokenizer.decode(tokens_gpu[0])
    print("sample:", report["sample"])

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [name for name, c in checks.items() if c["hard"] and not c["ok"]]
    print(
        f"gpu check: {len(checks) - len(failed)}/{len(checks)} passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
