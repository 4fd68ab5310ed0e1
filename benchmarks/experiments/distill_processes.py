"""The distill stage in one process and under `torchrun` with several, on the same global batch.

    python -m benchmarks.experiments.distill_processes [--processes 2] [--tokens 16384] [--rounds 1]

Each round runs a distill-only recipe on the reference model (20 of 30 layers, loss-based choice,
KD + 0.5 CE on WikiText-2 valid, no teacher answers or correction) three times: `optimize` in one process
with `batch_size` B x processes, and `torchrun --nproc-per-node N -m pipeline` with `batch_size` B under
DDP and under FSDP (`parallel: fsdp`), so all read the same blocks in every step. Prints training
tokens/s, the stage's wall time, the parameters each process holds while training, each process's
resident memory when training starts and at its peak, the student's held-out perplexity, and how far
the students' weights are from the one-process student; writes JSON (with the peak RSS of the
largest process over the whole command, which converts the GGUF too).
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

ROOT = Path(__file__).resolve().parents[2]
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
      parallel: {parallel}
"""

# the peak RSS of the largest process the command started (Linux counts descendants that were waited for)
PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(f'peak-rss-kib {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); sys.exit(rc)"
)


def run_variant(workdir: Path, processes: int, per_process: int, tokens: int, round_: int, parallel: str) -> dict:
    name = f"p{processes}-{parallel}-r{round_}" if processes > 1 else f"p1-r{round_}"
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, gguf=GGUF, tokens=tokens, batch=per_process, parallel=parallel))
    launcher = (
        [sys.executable, "-m", "pipeline"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
            "-m",
            "pipeline",
        ]
    )
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *launcher, str(recipe), "--workdir", str(workdir), "--force"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    seconds = time.perf_counter() - began
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    step = next((workdir / name).glob("01-distill-*"))
    manifest = json.loads((step / "manifest.json").read_text())
    m = manifest["metrics"]
    training = manifest["training"]
    return {
        "name": name,
        "processes": processes,
        "parallel": parallel if processes > 1 else "-",
        "batch_per_process": per_process,
        "threads_per_process": 1 if processes > 1 else torch.get_num_threads(),
        "steps": len(manifest["training"]["loss"]),
        "tokens_seen": m["tokens_seen"],
        "train_tokens_per_second": m["train_tokens_per_second"],
        "stage_seconds": manifest["timing"]["seconds"],
        "command_seconds": seconds,
        "heldout_perplexity": m["perplexity"],
        "student": str(step),
        "student_parameters_held": training["student_parameters_held"],
        "teacher_parameters_held": training["teacher_parameters_held"],
        "peak_rss_mib": int(out.stderr.rsplit("peak-rss-kib ", 1)[1].split()[0]) / 1024,
        "start_rss_mib_per_process": training["start_rss_mib"],
        "peak_rss_mib_per_process": training["peak_rss_mib"],
    }


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
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill" / "distill_processes.json"
    )
    args = parser.parse_args()
    if not GGUF.is_file():
        sys.exit(f"{GGUF} is missing: run `make model` first")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    variants = [
        (1, "ddp", args.batch * args.processes),
        (args.processes, "ddp", args.batch),
        (args.processes, "fsdp", args.batch),
    ]
    for r in range(args.rounds):
        alone = None
        for processes, parallel, batch in variants:
            row = run_variant(args.workdir, processes, batch, args.tokens, r, parallel)
            alone = alone or row
            row["max_weight_diff_to_one_process"] = max_weight_diff(alone["student"], row["student"])
            rows.append(row)
            print(f"  {row['name']}: {row['train_tokens_per_second']:.1f} tokens/s", flush=True)

    print(
        "\n| processes x training threads | parallel | blocks/process | steps | tokens | train tokens/s | stage s "
        "| student / teacher M params per process | RSS MiB per process at the first step | peak RSS MiB per "
        "process | held-out ppl | max abs weight diff to 1 process |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['processes']} x {row['threads_per_process']} | {row['parallel']} | {row['batch_per_process']} | "
            f"{row['steps']} | {row['tokens_seen']} | {row['train_tokens_per_second']:.1f} | {row['stage_seconds']:.0f} | "
            f"{row['student_parameters_held'] / 1e6:.1f} / {row['teacher_parameters_held'] / 1e6:.1f} | "
            f"{' / '.join(f'{x:.0f}' for x in row['start_rss_mib_per_process'])} | "
            f"{' / '.join(f'{x:.0f}' for x in row['peak_rss_mib_per_process'])} | "
            f"{row['heldout_perplexity']:.3f} | {row['max_weight_diff_to_one_process']:.2e} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
