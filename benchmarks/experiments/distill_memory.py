"""Memory and speed of the distillation loop: this checkout against another revision, on the reference model.

    python -m benchmarks.experiments.distill_memory TEACHER [--against REV] [--batches 4,8] [--steps 4] [--rounds 2]

TEACHER is an hf-model artifact (the model step of a SmolLM2 run). Each run is a fresh process that
loads the teacher, keeps 20 of its 30 layers (uniform choice: no scoring), and calls the training
loop (pipeline/distill/train.py) for `--steps` steps of `batch` × 256 tokens (random token ids), KD (T = 2)
+ 0.5 CE, bf16 autocast where the CPU has it (`--bf16`), then one held-out evaluation of 8 blocks. The peak resident
memory is reset once the models are loaded (/proc/self/clear_refs), so the figure is the loop's own
peak. `--against REV` runs the same script with that revision's `pipeline/` (a git worktree in a temp
folder) in alternation with this checkout's. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEQUENCE = 256


def child(teacher_path: str, batch: int, steps: int, bf16: str) -> None:
    """One measured run, in this process; prints one JSON line."""
    import numpy as np
    import torch

    from pipeline.configs import DistillConfig, DistillLossConfig
    from pipeline.distill.prune import choose_layers, prune_depth
    from pipeline.distill.train import train
    from pipeline.models import load_torch_model

    teacher = load_torch_model(Path(teacher_path), attention="sdpa")
    student = prune_depth(teacher, choose_layers(teacher.config.num_hidden_layers, 20, "uniform"))
    vocab = teacher.config.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, (batch * steps + 8, SEQUENCE))
    blocks = torch.from_numpy(ids)
    cfg = DistillConfig(
        num_layers=20,
        sequence_length=SEQUENCE,
        batch_size=batch,
        grad_accum=1,
        tokens=batch * steps * SEQUENCE,
        eval_every=10**6,
        checkpoint_every=10**6,
        eval_samples=8,
        bf16=bf16,
        loss=DistillLossConfig(kd=1.0, ce=0.5, temperature=2.0),
    )
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from here: the loop's own
    with tempfile.TemporaryDirectory() as ckpt:
        _, history = train(student, teacher, blocks[: batch * steps], blocks[-8:], {}, cfg, Path(ckpt), lambda _m: None)
    print(
        json.dumps(
            {
                "batch": batch,
                "steps": steps,
                "rss_before_mib": before,
                "peak_rss_mib": _status_mib("VmHWM"),
                "train_tokens_per_second": history.tokens_seen / history.train_seconds,
                "loss": history.loss,
                "heldout_perplexity": history.eval_ppl[-1],
                "kl": history.eval_kl[-1],
                "threads": torch.get_num_threads(),
            }
        )
    )


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run(checkout: Path, teacher: str, batch: int, steps: int, bf16: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            teacher,
            "--batches",
            str(batch),
            "--steps",
            str(steps),
            "--bf16",
            bf16,
        ],
        cwd=checkout,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(checkout)},
    )
    if out.returncode != 0:
        sys.exit(f"run in {checkout} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("--against", help="a git revision to compare with (its pipeline/ in a worktree)")
    parser.add_argument("--batches", default="4,8", help="blocks of 256 tokens per step, comma-separated")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--bf16",
        default="auto",
        choices=("auto", "true", "false"),
        help="the loop's bf16 autocast (auto: where the CPU computes bf16 natively)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill" / "distill_memory.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        child(args.teacher, batches[0], args.steps, args.bf16)
        return 0
    teacher = str(Path(args.teacher).resolve())
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    checkouts = [(f"this checkout ({head}{'+' if _dirty() else ''})", ROOT)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            other = Path(tmp) / "against"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(other), args.against],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            checkouts.append((args.against, other))
        rows = []
        try:
            for r in range(args.rounds):
                for batch in batches:
                    for name, path in checkouts:
                        row = {"code": name, "round": r, **run(path, teacher, batch, args.steps, args.bf16)}
                        rows.append(row)
                        print(
                            f"  {name}, batch {batch}, round {r}: peak {row['peak_rss_mib']:.0f} MiB, "
                            f"{row['train_tokens_per_second']:.1f} tokens/s",
                            flush=True,
                        )
        finally:
            if args.against:
                subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True)
    print(
        "\n| code | blocks of 256 per step | round | RSS after loading MiB | loop's peak RSS MiB | loop's own growth MiB "
        "| training tokens/s | last step loss | held-out ppl |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['code']} | {row['batch']} | {row['round']} | {row['rss_before_mib']:.0f} | {row['peak_rss_mib']:.0f} | "
            f"{row['peak_rss_mib'] - row['rss_before_mib']:.0f} | {row['train_tokens_per_second']:.1f} | "
            f"{row['loss'][-1]:.6f} | {row['heldout_perplexity']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _dirty() -> bool:
    return bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--", "pipeline"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )


if __name__ == "__main__":
    sys.exit(main())
