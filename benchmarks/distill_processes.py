"""The distill stage in one process and under `torchrun` with several, on the same global batch.

    python benchmarks/distill_processes.py [--processes 2] [--tokens 16384] [--rounds 1]

Each round runs a distill-only recipe on the reference model (20 of 30 layers, loss-based choice,
KD + 0.5 CE on WikiText-2 valid, no teacher answers or correction) twice: `optimize` in one process with
`batch_size` B x processes, and `torchrun --nproc-per-node N -m pipeline` with `batch_size` B, so both read
the same blocks in every step. Prints training tokens/s, the stage's wall time and the student's held-out
perplexity for each, and how far apart the two students' weights are; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

RECIPE = """\
name: {name}
model: {{source: {gguf}}}
stages:
  - distill:
      num_layers: 20
      train_data: [{{source: wikitext-2, split: valid}}]
      tokens: {tokens}
      batch_size: {batch}
      grad_accum: 2
      eval_every: 1000
      checkpoint_every: 1000
      loss: {{kd: 1.0, ce: 0.5}}
"""


def run_variant(workdir: Path, processes: int, per_process: int, tokens: int, round_: int) -> dict:
    name = f"p{processes}-r{round_}"
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, gguf=GGUF, tokens=tokens, batch=per_process))
    launcher = [sys.executable, "-m", "pipeline"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "pipeline"]
    began = time.perf_counter()
    out = subprocess.run([*launcher, str(recipe), "--workdir", str(workdir), "--force"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - began
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    step = next((workdir / name).glob("01-distill-*"))
    manifest = json.loads((step / "manifest.json").read_text())
    m = manifest["metrics"]
    return {"name": name, "processes": processes, "batch_per_process": per_process,
            "threads_per_process": 1 if processes > 1 else torch.get_num_threads(),
            "steps": len(manifest["training"]["loss"]), "tokens_seen": m["tokens_seen"],
            "train_tokens_per_second": m["train_tokens_per_second"], "stage_seconds": manifest["timing"]["seconds"],
            "command_seconds": seconds, "heldout_perplexity": m["perplexity"], "student": str(step)}


def max_weight_diff(a: str, b: str) -> float:
    x, y = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="blocks per process per micro-batch")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench-distill-processes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill" / "distill_processes.json")
    args = parser.parse_args()
    if not GGUF.is_file():
        sys.exit(f"{GGUF} is missing: run `make model` first")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(args.rounds):
        for processes in (1, args.processes):
            row = run_variant(args.workdir, processes, args.batch * (args.processes if processes == 1 else 1), args.tokens, r)
            rows.append(row)
            print(f"  {row['name']}: {row['train_tokens_per_second']:.1f} tokens/s", flush=True)
    diffs = [max_weight_diff(rows[i]["student"], rows[i + 1]["student"]) for i in range(0, len(rows), 2)]

    print("\n| processes x training threads | blocks/process | steps | tokens | train tokens/s | stage s | held-out ppl |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} x {row['threads_per_process']} | {row['batch_per_process']} | {row['steps']} | "
              f"{row['tokens_seen']} | {row['train_tokens_per_second']:.1f} | {row['stage_seconds']:.0f} | "
              f"{row['heldout_perplexity']:.3f} |")
    print(f"\nmax |weight difference| between the two students of each round: {', '.join(f'{d:.2e}' for d in diffs)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "max_weight_diff": diffs, "args": {k: str(v) for k, v in vars(args).items()}},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
