"""`optimize serve` on CUDA, in one run: `make serve-gpu-check` (or `python -m benchmarks.checks.serve_gpu_check RUN`).

Checks, each recorded pass/fail in serve_gpu_check.json (exit status 1 when a hard check fails):
  slots_on_device  the server's KV slots are CUDA memory, and the session runs on CUDAExecutionProvider
  batch            four prompts prefilled into slots and decoded together against each alone through
                   the runner (greedy, CUDA)
  move             after a row moves into a freed hole (a device copy), every row's next logits against its
                   whole sequence prefilled from nothing
  prefix_reuse     a prompt whose cached prefix is copied from another row, on the device, against the
                   same prompt prefilled whole
  server           `optimize serve --provider cuda` answers a streamed and a plain chat request
Float16 kernels differ between batch shapes and query lengths, so token agreement is reported and
only the first HARD_PREFIX tokens (and the reused prefix's argmax) are hard checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.checks.gpu_check import HARD_PREFIX, NEW_TOKENS, PROMPTS, agreement
from runtime import Generator, find_model_folder
from runtime.serve.launch import serve_process
from runtime.serve.slots import SlotCache


def decode_together(slots: SlotCache, prompts: list[list[int]], steps: int) -> list[list[int]]:
    tokens = [[int(np.argmax(slots.prefill(row, p)))] for row, p in enumerate(prompts)]
    for _ in range(steps - 1):
        logits = slots.decode(np.array([t[-1] for t in tokens]))
        for row, t in enumerate(tokens):
            t.append(int(np.argmax(logits[row])))
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="a run folder or export step whose fused graph is float16 (the CUDA recipe's)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument(
        "--provider",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: a dry run of this script on a machine without a GPU",
    )
    args = parser.parse_args()
    folder = find_model_folder(args.artifact)
    report: dict = {"artifact": str(folder), "checks": {}}

    def record(name: str, ok: bool, hard: bool = True, **facts) -> None:
        report["checks"][name] = {"ok": bool(ok), "hard": hard, **facts}
        print(f"[{'PASS' if ok else 'FAIL' if hard else 'NOTE'}] {name}: {json.dumps(facts, default=str)}", flush=True)

    gen = Generator(folder, provider=args.provider, graph="fused", cuda_graph=False)
    prompts = [gen.tokenizer.encode_chat(p) for p in PROMPTS]
    length = max(len(p) for p in prompts) + 2 * NEW_TOKENS + 8
    slots = SlotCache(gen.session, gen.contract, len(prompts), length, device=gen.device)
    record(
        "slots_on_device",
        gen.device == args.provider and all(v.device_name().lower() == args.provider for v in slots.values),
        provider=gen.provider,
        buffers=len(slots.values),
        kv_dtype=str(slots.kv_dtype),
        mib=round(slots.nbytes / 2**20, 1),
    )

    together = decode_together(slots, prompts, NEW_TOKENS)
    alone = [gen.generate([p], max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens[0] for p in prompts]
    share, shortest = agreement(together, alone)
    record("batch", shortest >= HARD_PREFIX, agreement=round(share, 3), shortest_common_prefix=shortest)

    # every row decodes half the tokens; row 0 ends and the last row moves into its hole (a device copy);
    # each row's next logits must be those of its whole sequence prefilled from nothing
    for row in range(len(prompts)):
        slots.free(row)
    slots.forget()
    half = NEW_TOKENS // 2
    tokens = decode_together(slots, prompts, half)
    slots.free(0)
    slots.move(len(prompts) - 1, 0)
    order = [len(prompts) - 1] + list(range(1, len(prompts) - 1))  # the sequence each row now holds
    after = slots.decode(np.array([tokens[seq][-1] for seq in order])).copy()
    whole = SlotCache(gen.session, gen.contract, 1, length, reuse_prefixes=False, device=gen.device)
    same, diffs = [], []
    for row, seq in enumerate(order):
        whole.free(0)
        ref = whole.prefill(0, prompts[seq] + tokens[seq])
        same.append(int(np.argmax(after[row])) == int(np.argmax(ref)))
        diffs.append(round(float(np.abs(after[row] - ref).max()), 4))
    record("move", all(same), argmax_equal=same, max_abs_logit_diff=diffs, moved_row_first=True, after_tokens=half)

    for row in range(len(prompts)):
        slots.free(row)
    slots.forget()
    prompt = prompts[0][:-4] + prompts[1][-6:]  # starts like row 0's prompt, which row 1 copies on the device
    expected = next(i for i, (a, b) in enumerate(zip(prompts[0] + [-1], prompt)) if a != b)
    slots.prefill(0, prompts[0])
    reused = slots.prefill(1, prompt).copy()
    cached = slots.last_cached
    whole.free(0)
    fresh = whole.prefill(0, prompt).copy()
    record(
        "prefix_reuse",
        cached == expected and int(np.argmax(reused)) == int(np.argmax(fresh)),
        cached_tokens=cached,
        expected=expected,
        max_abs_logit_diff=float(np.abs(reused - fresh).max()),
    )
    del slots, whole, gen

    import httpx

    # no prefix reuse: the streamed request must run exactly as the plain one did (a reused prefix's
    # continuation may round differently and take another path after a near-tie)
    with serve_process(
        folder, "--provider", args.provider, "--slots", "4", "--max-length", "1024", "--no-prefix-reuse"
    ) as (url, proc):
        body = {
            "model": folder.parent.name if (folder.parent / "run.json").is_file() else folder.name,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "temperature": 0,
            "max_tokens": 24,
        }
        plain = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        streamed = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
        health = httpx.get(f"{url}/health", timeout=10).json()
    text = plain["choices"][0]["message"]["content"]
    log = proc.stdout.read() if proc.stdout else ""  # the server has exited: its start-up lines say where the slots are
    memory = "GPU memory" if args.provider == "cuda" else "host memory"
    record(
        "server",
        bool(text) and text == "".join(streamed) and memory in log,
        reply=text,
        streamed="".join(streamed),
        health=health,
        start_lines=[line for line in log.splitlines() if "KV cache" in line or "graph on" in line],
    )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_gpu_check.json").write_text(json.dumps(report, indent=2))
    failed = [n for n, c in report["checks"].items() if c["hard"] and not c["ok"]]
    print(
        f"{'FAILED: ' + ', '.join(failed) if failed else 'all hard checks passed'}; wrote {args.out}/serve_gpu_check.json"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
