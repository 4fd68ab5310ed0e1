"""How stable is the loss-based layer choice? The layers it drops, from several calibration samples.

    python -m benchmarks.experiments.layer_choice_stability TEACHER --teacher-answers DISTILL/teacher_answers.jsonl

The distill stage scores each teacher layer by the loss increase when that layer alone is skipped, on
`importance_samples` (8) random blocks of its training text. Here a pool of `--pool` blocks is drawn the
stage's way and each block is scored alone by the stage's own `layer_importance`; the blocks are of one
length, so a sample's scores are the mean of its blocks' and any sample of the pool scores for free:
the pool cut into disjoint samples of `--sample` blocks, each giving its own choice, and the whole
pool giving one. Training text as the distill recipe's: WikiText-2 valid plus the
conversations a distill step's teacher wrote. Prints the layers dropped for each depth and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from calibration import sample_blocks
from pipeline.configs import DistillConfig, TextSourceConfig
from pipeline.distill.prune import choose_layers, layer_importance
from pipeline.distill.teacher_answers import read_answers
from pipeline.stages.distill import _data
from runtime.tokenizer import Tokenizer


def block_deltas(model, blocks: torch.Tensor) -> np.ndarray:
    """[layers, blocks]: the loss increase on each block when each layer alone is skipped."""
    columns = []
    for j in range(len(blocks)):
        columns.append(layer_importance(model, blocks[j : j + 1], "loss"))
        print(f"  block {j} scored", flush=True)
    return np.array(columns).T


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="an hf-model artifact folder (the model step)")
    parser.add_argument("--teacher-answers", type=Path, metavar="JSONL", required=True)
    parser.add_argument("--pool", type=int, default=32)
    parser.add_argument("--sample", type=int, default=DistillConfig.importance_samples)
    parser.add_argument("--depths", default="26,20")
    parser.add_argument("--seed", type=int, default=DistillConfig.seed)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench-distill/layer_choice_stability.json"))
    args = parser.parse_args()
    if args.pool % args.sample:
        parser.error(f"--pool {args.pool} is not a multiple of --sample {args.sample}")
    depths = [int(d) for d in args.depths.split(",")]
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = Tokenizer(args.teacher)
    cfg = DistillConfig(num_layers=depths[0], train_data=(TextSourceConfig("wikitext-2", "valid"),), seed=args.seed)
    train_blocks, _ = _data(cfg, tokenizer, read_answers(args.teacher_answers, tokenizer))
    pool = torch.from_numpy(sample_blocks(train_blocks.numpy().reshape(-1), cfg.sequence_length, args.pool, args.seed))
    started = time.perf_counter()
    deltas = block_deltas(teacher, pool)
    seconds = time.perf_counter() - started
    n = deltas.shape[0]
    samples = [
        (f"blocks {s}-{s + args.sample - 1}", deltas[:, s : s + args.sample]) for s in range(0, args.pool, args.sample)
    ]
    samples.append((f"all {args.pool} blocks", deltas))
    rows = []
    for name, d in samples:
        scores = d.mean(axis=1).tolist()
        dropped = {depth: sorted(set(range(n)) - set(choose_layers(n, depth, "loss", scores))) for depth in depths}
        rows.append({"sample": name, "blocks": d.shape[1], "scores": scores, "dropped": dropped})
    print(f"\n{n} layers scored on {args.pool} blocks of {cfg.sequence_length} tokens in {seconds:.0f} s")
    print("| sample | " + " | ".join(f"dropped for {depth} layers" for depth in depths) + " |")
    print("|---|" + "---|" * len(depths))
    for r in rows:
        print(f"| {r['sample']} | " + " | ".join(", ".join(map(str, r["dropped"][depth])) for depth in depths) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "teacher": str(args.teacher),
                "teacher_answers": str(args.teacher_answers),
                "pool": args.pool,
                "sample": args.sample,
                "seed": args.seed,
                "sequence_length": cfg.sequence_length,
                "seconds": seconds,
                "block_deltas": deltas.tolist(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
