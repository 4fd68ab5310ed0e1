"""Distillation on the reference model: which layers to drop, and KD against plain fine-tuning.

    python benchmarks/distill_matrix.py artifacts/smollm2-fp32/00-model-* --layers 20 --tokens 200000
    python benchmarks/distill_matrix.py TEACHER --tokens 250000,1000000,2000000 --batch-size 16 --grad-accum 1   # a GPU
    python benchmarks/distill_matrix.py TEACHER --choices loss --trained kd,ce,kd+ce --teacher-correction 100000
    python benchmarks/distill_matrix.py TEACHER --choices loss --trained ce,kd+ce --teacher-correction 100000 --seed 1

Teacher: the hf-model artifact given (SmolLM2-135M-Instruct, 30 layers). Student: `--layers` of them.
Rows: the teacher; the pruned student with layers dropped uniformly, by block influence (hidden)
and by the loss increase when each layer alone is skipped (loss), untrained; then the loss-chosen
student trained for the same token budget with each loss that `--trained` names: knowledge
distillation (KL to the teacher at T = 2, or T = 1), the two mixed as the shipped recipe does
(KL at T = 2 plus 0.5 cross-entropy), and plain cross-entropy on the text. With
`--teacher-correction TOKENS` the teacher is first fine-tuned on the training text (cross-entropy,
pipeline/distill/correct.py), and the layer choice, the students and KD all start from that corrected
teacher; its perplexity is a row of its own. `--seed` seeds everything random: the blocks that score the
layers, the order of the training blocks, and the correction's. Training text:
WikiText-2 valid + Tiny Shakespeare (the distill stage's defaults); perplexity: WikiText-2 test,
40 windows of 512 tokens (the validate stage's protocol), through PyTorch. Training runs where
accelerate puts it (a GPU when there is one). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import load_text, sample_blocks, windows  # noqa: E402
from pipeline.configs import DistillConfig, DistillLossConfig, TeacherCorrectionConfig, TextSourceConfig  # noqa: E402
from pipeline.distill.correct import correct_teacher  # noqa: E402
from pipeline.distill.prune import choose_layers, layer_importance, prune_depth  # noqa: E402
from pipeline.distill.train import train  # noqa: E402
from pipeline.stages.distill import _data  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402


@torch.no_grad()
def perplexity(model, ids: np.ndarray, context: int = 512, max_windows: int = 40, cache=None) -> float:
    """`cache`: a callable giving each window a fresh transformers cache to attend through (None: no cache)."""
    nll, scored = 0.0, 0
    for w in windows(len(ids), context, context, max_windows):
        window = torch.from_numpy(ids[w.begin:w.end])[None].to(next(model.parameters()).device)
        past = cache() if cache is not None else None
        logits = model(input_ids=window, past_key_values=past, use_cache=past is not None).logits[0]
        targets = window[0, len(window[0]) - w.scored:]
        lp = torch.log_softmax(logits[len(window[0]) - w.scored - 1:-1].double(), dim=-1)
        nll -= lp.gather(1, targets[:, None]).sum().item()
        scored += w.scored
    return math.exp(nll / scored)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="an hf-model artifact folder (the model step)")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--tokens", default="200000",
                        help="training budget of each trained row; several, comma-separated, give a row pair each")
    parser.add_argument("--batch-size", type=int, default=DistillConfig.batch_size)
    parser.add_argument("--grad-accum", type=int, default=DistillConfig.grad_accum)
    parser.add_argument("--trained", default="kd,ce", help="trained rows to run, comma-separated: kd, kd-t1, kd+ce, kd-t1+ce, ce")
    parser.add_argument("--train-data", default="wikitext-2:valid,tinyshakespeare:all",
                        help="training texts as source:split, comma-separated (the distill stage's defaults)")
    parser.add_argument("--choices", default="uniform,hidden,loss",
                        help="layer choices to score and report untrained; the trained rows use the last one")
    parser.add_argument("--teacher-correction", type=int, default=0, metavar="TOKENS",
                        help="fine-tune the teacher on the training text for this many tokens first (0: no)")
    parser.add_argument("--correction-lr", type=float, default=TeacherCorrectionConfig.lr)
    parser.add_argument("--seed", type=int, default=DistillConfig.seed,
                        help="seed of the layer-scoring sample and of the training order (correction and students)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench-distill/distill_matrix.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = Tokenizer(args.teacher)
    test_ids = np.array(tokenizer.encode(load_text("wikitext-2", "test"), add_special_tokens=False), dtype=np.int64)
    budgets = [int(t) for t in args.tokens.split(",")]
    sources = tuple(TextSourceConfig(*item.split(":", 1)) for item in args.train_data.split(","))
    cfg = DistillConfig(num_layers=args.layers, tokens=budgets[0], batch_size=args.batch_size, grad_accum=args.grad_accum,
                        train_data=sources, seed=args.seed)
    train_blocks, eval_blocks = _data(cfg, tokenizer)
    calib = torch.from_numpy(sample_blocks(train_blocks.numpy().reshape(-1), cfg.sequence_length,
                                           cfg.importance_samples, cfg.seed))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def save(rows: list[dict], complete: bool) -> None:
        """After every row, so a long run that is stopped keeps what it measured."""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"teacher": str(args.teacher), "layers": args.layers, "tokens": budgets,
                                        "train_data": args.train_data, "teacher_correction": args.teacher_correction,
                                        "correction_lr": args.correction_lr if args.teacher_correction else None,
                                        "seed": args.seed,
                                        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "device": device,
                                        "threads": torch.get_num_threads(), "complete": complete, "rows": rows},
                                       indent=2) + "\n")

    rows = [{"row": f"teacher ({teacher.config.num_hidden_layers} layers)", "perplexity": perplexity(teacher, test_ids)}]
    print(f"teacher: {rows[0]['perplexity']:.3f}", flush=True)
    original_ppl = rows[0]["perplexity"]
    if args.teacher_correction:
        correction = TeacherCorrectionConfig(tokens=args.teacher_correction, lr=args.correction_lr)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as checkpoints:
            teacher, info = correct_teacher(teacher, train_blocks, eval_blocks,
                                            dataclasses.replace(cfg, teacher_correction=correction), Path(checkpoints), print)
        rows.append({"row": f"teacher corrected on the training text, {info['tokens']:,} tokens",
                     "perplexity": perplexity(teacher, test_ids), "wall_seconds": time.perf_counter() - started,
                     "correction": info})
        print(f"corrected teacher: {rows[-1]['perplexity']:.3f}", flush=True)
    kept = {}
    choices = args.choices.split(",")
    for how in choices:
        started = time.perf_counter()
        scores = None if how == "uniform" else layer_importance(teacher, calib, how)
        kept[how] = choose_layers(teacher.config.num_hidden_layers, args.layers, how, scores)
        ppl = perplexity(prune_depth(teacher, kept[how]), test_ids)
        rows.append({"row": f"pruned, {how} choice, untrained", "perplexity": ppl, "layers": kept[how],
                     "scoring_seconds": time.perf_counter() - started})
        print(f"pruned ({how}): {ppl:.3f} layers {kept[how]}", flush=True)
    trained = {"kd": ("knowledge distillation (KL, T=2)", DistillLossConfig(kd=1.0)),
               "kd-t1": ("knowledge distillation (KL, T=1)", DistillLossConfig(kd=1.0, temperature=1.0)),
               "kd+ce": ("KD (KL, T=2) + 0.5 cross-entropy, the shipped mix", DistillLossConfig(kd=1.0, ce=0.5)),
               "kd-t1+ce": ("KD (KL, T=1) + 0.5 cross-entropy", DistillLossConfig(kd=1.0, ce=0.5, temperature=1.0)),
               "ce": ("cross-entropy fine-tuning", DistillLossConfig(kd=0.0, ce=1.0))}
    unknown = set(args.trained.split(",")) - set(trained)
    if unknown:
        parser.error(f"--trained: {', '.join(sorted(unknown))} not one of {', '.join(trained)}")
    runs = [(tokens, *trained[key]) for tokens in budgets for key in args.trained.split(",")]
    chosen = kept[choices[-1]]  # the trained rows start from the last choice's student
    for tokens, name, loss in runs:
        student = prune_depth(teacher, chosen)
        run_cfg = dataclasses.replace(cfg, loss=loss, tokens=tokens)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as checkpoints:
            history = train(student, teacher, train_blocks, eval_blocks, dict(enumerate(chosen)), run_cfg,
                            Path(checkpoints), print)
        wall = time.perf_counter() - started
        ppl = perplexity(student.eval(), test_ids)
        rows.append({"row": f"{choices[-1]} choice + {name}, {history.tokens_seen:,} tokens", "perplexity": ppl,
                     "train_tokens_per_second": history.tokens_seen / history.train_seconds, "wall_seconds": wall,
                     "heldout_kl": history.eval_kl[-1] if history.eval_kl else None,
                     "heldout_curve": list(zip(history.eval_steps, history.eval_ppl))})
        print(f"{name}: {ppl:.3f} in {wall:.0f}s", flush=True)
        save(rows, complete=False)

    # the gap is the one pruning opened below the original teacher, so rows with and without correction compare
    teacher_ppl, pruned_ppl = original_ppl, rows[len(rows) - len(runs) - 1]["perplexity"]
    print("\n| row | WikiText-2 test perplexity | gap recovered |\n|---|---|---|")
    for r in rows:
        gap = (pruned_ppl - r["perplexity"]) / (pruned_ppl - teacher_ppl) if "train_tokens_per_second" in r else None
        print(f"| {r['row']} | {r['perplexity']:.3f} | {'' if gap is None else f'{gap * 100:.0f} %'} |")
    save(rows, complete=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
