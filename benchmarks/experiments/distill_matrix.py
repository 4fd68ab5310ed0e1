"""Distillation on the reference model: which layers to drop, and KD against plain fine-tuning.

    python -m benchmarks.experiments.distill_matrix artifacts/smollm2-fp32/00-model-* --layers 20 --tokens 200000
    python -m benchmarks.experiments.distill_matrix TEACHER --tokens 250000,1000000,2000000 --batch-size 16 --grad-accum 1   # a GPU
    python -m benchmarks.experiments.distill_matrix TEACHER --choices loss --trained kd,ce,kd+ce --teacher-correction 100000
    python -m benchmarks.experiments.distill_matrix TEACHER --choices loss --trained ce,kd+ce --teacher-correction 100000 --seed 1
    python -m benchmarks.experiments.distill_matrix TEACHER --choices loss --trained kd --train-data none \
        --teacher-answers STUDENT/teacher_answers.jsonl --chat --students STUDENT

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
WikiText-2 valid + Tiny Shakespeare (the distill stage's defaults); `--teacher-answers` adds the
conversations a distill step's teacher wrote (its `teacher_answers.jsonl`), and `--train-data none`
leaves only them. Perplexity: WikiText-2 test, 40 windows of 512 tokens (the validate stage's protocol),
through PyTorch. `--chat` adds the validate stage's chat checks to every row, in PyTorch: of the built-in
set's 60 facts, how many the greedy reply names; of its 76 prompts, how many replies end their turn within
64 tokens; and the perplexity of the original teacher's replies under the row's model. `--students` adds
rows for students a distill step already trained (its output folders). `--drops "3,4,5,26;4,5,13,17"`
trains from given layer sets instead of the last choice's (the teacher layers each one drops), and
`--train-seeds 0,1` repeats every trained row with each training-order seed (the layer-scoring sample
keeps `--seed`): does the pick matter more than the seed? Training runs where
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

from calibration import load_text, sample_blocks, windows
from calibration.chat_set import builtin_chat_set, mentions
from pipeline.configs import DistillConfig, DistillLossConfig, TeacherCorrectionConfig, TextSourceConfig
from pipeline.distill.correct import correct_teacher
from pipeline.distill.prune import choose_layers, layer_importance, prune_depth
from pipeline.distill.teacher_answers import conversations_stream, read_answers
from pipeline.distill.train import train
from pipeline.models import torch_greedy
from pipeline.stages.distill import _data, split_blocks
from pipeline.stages.validate.chat import score_replies
from runtime.generate import end_tokens, read_json
from runtime.tokenizer import Tokenizer


@torch.no_grad()
def perplexity(model, ids: np.ndarray, context: int = 512, max_windows: int = 40, cache=None) -> float:
    """`cache`: a callable giving each window a fresh transformers cache to attend through (None: no cache)."""
    nll, scored = 0.0, 0
    for w in windows(len(ids), context, context, max_windows):
        window = torch.from_numpy(ids[w.begin : w.end])[None].to(next(model.parameters()).device)
        past = cache() if cache is not None else None
        logits = model(input_ids=window, past_key_values=past, use_cache=past is not None).logits[0]
        targets = window[0, len(window[0]) - w.scored :]
        lp = torch.log_softmax(logits[len(window[0]) - w.scored - 1 : -1].double(), dim=-1)
        nll -= lp.gather(1, targets[:, None]).sum().item()
        scored += w.scored
    return math.exp(nll / scored)


class ChatProbe:
    """The validate stage's chat checks in PyTorch, for any model of the teacher's family."""

    def __init__(self, folder: Path, tokenizer: Tokenizer):
        self.items = builtin_chat_set()
        self.tokenizer = tokenizer
        self.prompts = [tokenizer.encode_chat(item.prompt) for item in self.items]
        self.eos, self.pad = end_tokens(read_json(folder / "generation_config.json"))
        # the original teacher's replies and end tokens
        self.reference: list[tuple[list[int], int | None]] | None = None

    @torch.no_grad()
    def measure(self, model) -> dict:
        replies = torch_greedy(model, self.prompts, 64, self.eos, self.pad, 16)
        facts = [
            mentions(self.tokenizer.decode(r), item.answers)
            for (r, _), item in zip(replies, self.items)
            if item.answers
        ]
        if self.reference is None:
            self.reference = replies
        device = next(model.parameters()).device
        nll, _, count = score_replies(
            lambda seq: model(input_ids=torch.tensor([seq], device=device)).logits[0], self.prompts, self.reference
        )
        return {
            "chat_facts": sum(facts),
            "chat_fact_questions": len(facts),
            "chat_turns_ended": sum(end is not None for _, end in replies),
            "chat_prompts": len(replies),
            "teacher_reply_perplexity": math.exp(nll / count),
            "chat_sample": [self.tokenizer.decode(r) for r, _ in replies[:3]],
        }


def parse_drops(parser: argparse.ArgumentParser, text: str, n: int, layers: int) -> list[list[int]]:
    """--drops "3,4,5,26;4,5,13,17" -> the layer sets, each naming n - layers distinct layers of the teacher."""
    if not text:
        return []
    try:
        drop_sets = [sorted({int(i) for i in part.split(",")}) for part in text.split(";")]
    except ValueError:
        parser.error(f"--drops {text!r}: give layer indices, e.g. 3,4,5,26;4,5,13,17")
    for drop in drop_sets:
        if len(drop) != n - layers or not all(0 <= i < n for i in drop):
            parser.error(
                f"--drops: {drop} must name {n - layers} distinct layers of 0..{n - 1} "
                f"(the teacher's {n} less --layers {layers})"
            )
    return drop_sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="an hf-model artifact folder (the model step)")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument(
        "--depths",
        default="",
        metavar="N,N",
        help="more student depths to prune to and measure untrained, with each choice (comma-separated)",
    )
    parser.add_argument(
        "--tokens",
        default="200000",
        help="training budget of each trained row; several, comma-separated, give a row pair each",
    )
    parser.add_argument("--batch-size", type=int, default=DistillConfig.batch_size)
    parser.add_argument("--grad-accum", type=int, default=DistillConfig.grad_accum)
    parser.add_argument(
        "--trained",
        default="kd,ce",
        help="trained rows to run, comma-separated: kd, kd-t1, kd+ce, kd-t1+ce, ce; or none",
    )
    parser.add_argument(
        "--train-data",
        default="wikitext-2:valid,tinyshakespeare:all",
        help="training texts as source:split, comma-separated (the distill stage's defaults); "
        "none: only --teacher-answers",
    )
    parser.add_argument(
        "--teacher-answers",
        type=Path,
        metavar="JSONL",
        help="a distill step's teacher_answers.jsonl: its conversations join the training text",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="chat checks on every row (facts, turns ended, the teacher's replies' perplexity)",
    )
    parser.add_argument(
        "--students",
        default="",
        metavar="DIRS",
        help="students a distill step trained (output folders, comma-separated): measured as rows",
    )
    parser.add_argument(
        "--choices",
        default="uniform,hidden,loss",
        help="layer choices to score and report untrained; the trained rows use the last one",
    )
    parser.add_argument(
        "--teacher-correction",
        type=int,
        default=0,
        metavar="TOKENS",
        help="fine-tune the teacher on the training text for this many tokens first (0: no)",
    )
    parser.add_argument("--correction-lr", type=float, default=TeacherCorrectionConfig.lr)
    parser.add_argument(
        "--seed",
        type=int,
        default=DistillConfig.seed,
        help="seed of the layer-scoring sample and of the training order (correction and students)",
    )
    parser.add_argument(
        "--drops",
        default="",
        metavar="I,J;K,L",
        help="teacher layers to drop, one set per ';': the trained rows start from each set instead "
        "of the last choice's",
    )
    parser.add_argument(
        "--train-seeds",
        default="",
        metavar="S,S",
        help="training-order seeds: every trained row once per seed (default: --seed)",
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench-distill/distill_matrix.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = Tokenizer(args.teacher)
    drop_sets = parse_drops(parser, args.drops, teacher.config.num_hidden_layers, args.layers)
    test_ids = np.array(tokenizer.encode(load_text("wikitext-2", "test"), add_special_tokens=False), dtype=np.int64)
    budgets = [int(t) for t in args.tokens.split(",")]
    if args.train_data == "none" and args.teacher_answers is None:
        parser.error("--train-data none leaves no training text: give --teacher-answers")
    answers = read_answers(args.teacher_answers, tokenizer) if args.teacher_answers else None
    sources = (
        ()
        if args.train_data == "none"
        else tuple(TextSourceConfig(*item.split(":", 1)) for item in args.train_data.split(","))
    )
    cfg = DistillConfig(
        num_layers=args.layers,
        tokens=budgets[0],
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        train_data=sources or DistillConfig.train_data,
        seed=args.seed,
    )
    if sources:
        train_blocks, eval_blocks = _data(cfg, tokenizer, answers)
    else:
        train_blocks, eval_blocks = split_blocks([conversations_stream(answers)], cfg)
    chat = ChatProbe(args.teacher, tokenizer) if args.chat else None

    def measure(model) -> dict:
        """Test perplexity, and the chat checks with --chat."""
        return {"perplexity": perplexity(model, test_ids), **(chat.measure(model) if chat else {})}

    calib = torch.from_numpy(
        sample_blocks(train_blocks.numpy().reshape(-1), cfg.sequence_length, cfg.importance_samples, cfg.seed)
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def save(rows: list[dict], complete: bool) -> None:
        """After every row, so a long run that is stopped keeps what it measured."""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "teacher": str(args.teacher),
                    "layers": args.layers,
                    "tokens": budgets,
                    "train_data": args.train_data,
                    "teacher_answers": str(args.teacher_answers) if answers else None,
                    "conversations": len(answers) if answers else 0,
                    "teacher_correction": args.teacher_correction,
                    "correction_lr": args.correction_lr if args.teacher_correction else None,
                    "seed": args.seed,
                    "batch_size": cfg.batch_size,
                    "grad_accum": cfg.grad_accum,
                    "device": device,
                    "threads": torch.get_num_threads(),
                    "complete": complete,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )

    rows = [{"row": f"teacher ({teacher.config.num_hidden_layers} layers)", **measure(teacher)}]
    print(f"teacher: {rows[0]['perplexity']:.3f}", flush=True)
    original_ppl = rows[0]["perplexity"]
    if args.teacher_correction:
        correction = TeacherCorrectionConfig(tokens=args.teacher_correction, lr=args.correction_lr)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as checkpoints:
            teacher, info = correct_teacher(
                teacher,
                train_blocks,
                eval_blocks,
                dataclasses.replace(cfg, teacher_correction=correction),
                Path(checkpoints),
                print,
            )
        rows.append(
            {
                "row": f"teacher corrected on the training text, {info['tokens']:,} tokens",
                **measure(teacher),
                "wall_seconds": time.perf_counter() - started,
                "correction": info,
            }
        )
        print(f"corrected teacher: {rows[-1]['perplexity']:.3f}", flush=True)
    kept = {}
    choices = args.choices.split(",")
    for how in choices:
        started = time.perf_counter()
        scores = None if how == "uniform" else layer_importance(teacher, calib, how)
        scoring_seconds = time.perf_counter() - started
        for depth in [int(d) for d in filter(None, args.depths.split(","))]:
            keep = choose_layers(teacher.config.num_hidden_layers, depth, how, scores)
            rows.append(
                {
                    "row": f"pruned to {depth} layers, {how} choice, untrained",
                    **measure(prune_depth(teacher, keep)),
                    "layers": keep,
                }
            )
            print(f"pruned to {depth} ({how}): {rows[-1]['perplexity']:.3f} layers {keep}", flush=True)
        kept[how] = choose_layers(teacher.config.num_hidden_layers, args.layers, how, scores)
        rows.append(
            {
                "row": f"pruned to {args.layers} layers, {how} choice, untrained",
                **measure(prune_depth(teacher, kept[how])),
                "layers": kept[how],
                "scoring_seconds": scoring_seconds,
            }
        )
        print(f"pruned ({how}): {rows[-1]['perplexity']:.3f} layers {kept[how]}", flush=True)
    pruned_ppl = rows[-1]["perplexity"]  # the trained rows start from the last choice's student
    trained = {
        "kd": ("knowledge distillation (KL, T=2)", DistillLossConfig(kd=1.0)),
        "kd-t1": ("knowledge distillation (KL, T=1)", DistillLossConfig(kd=1.0, temperature=1.0)),
        "kd+ce": ("KD (KL, T=2) + 0.5 cross-entropy, the shipped mix", DistillLossConfig(kd=1.0, ce=0.5)),
        "kd-t1+ce": ("KD (KL, T=1) + 0.5 cross-entropy", DistillLossConfig(kd=1.0, ce=0.5, temperature=1.0)),
        "ce": ("cross-entropy fine-tuning", DistillLossConfig(kd=0.0, ce=1.0)),
    }
    keys = [] if args.trained == "none" else args.trained.split(",")
    unknown = set(keys) - set(trained)
    if unknown:
        parser.error(f"--trained: {', '.join(sorted(unknown))} not one of {', '.join(trained)} (or none)")
    n = teacher.config.num_hidden_layers
    starts = [(f"{choices[-1]} choice", kept[choices[-1]], pruned_ppl)]  # by default the last choice's student
    if drop_sets:
        starts = []
        for drop in drop_sets:
            keep = [i for i in range(n) if i not in drop]
            rows.append(
                {
                    "row": f"dropping {','.join(map(str, drop))}, untrained",
                    **measure(prune_depth(teacher, keep)),
                    "layers": keep,
                }
            )
            print(f"dropping {drop}: {rows[-1]['perplexity']:.3f}", flush=True)
            starts.append((f"dropping {','.join(map(str, drop))}", keep, rows[-1]["perplexity"]))
    seeds = [int(x) for x in args.train_seeds.split(",")] if args.train_seeds else [args.seed]
    runs = [
        (seed, start, tokens, *trained[key]) for seed in seeds for start in starts for tokens in budgets for key in keys
    ]
    for seed, (start_name, chosen, start_ppl), tokens, name, loss in runs:
        student = prune_depth(teacher, chosen)
        run_cfg = dataclasses.replace(cfg, loss=loss, tokens=tokens, seed=seed)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as checkpoints:
            student, history = train(
                student, teacher, train_blocks, eval_blocks, dict(enumerate(chosen)), run_cfg, Path(checkpoints), print
            )
        wall = time.perf_counter() - started
        seed_note = f", training seed {seed}" if args.train_seeds else ""
        rows.append(
            {
                "row": f"{start_name} + {name}, {history.tokens_seen:,} tokens{seed_note}",
                **measure(student.eval()),
                "layers": chosen,
                "train_seed": seed,
                "start_perplexity": start_ppl,
                "train_tokens_per_second": history.tokens_seen / history.train_seconds,
                "wall_seconds": wall,
                "heldout_kl": history.eval_kl[-1] if history.eval_kl else None,
                "heldout_curve": list(zip(history.eval_steps, history.eval_ppl)),
            }
        )
        print(f"{name}: {rows[-1]['perplexity']:.3f} in {wall:.0f}s", flush=True)
        save(rows, complete=False)
    for folder in filter(None, args.students.split(",")):
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        rows.append({"row": f"student {folder}", **measure(student), "student": folder})
        print(f"{folder}: {rows[-1]['perplexity']:.3f}", flush=True)
        save(rows, complete=False)

    # the gap is the one pruning opened below the original teacher, so rows with and without correction compare
    teacher_ppl = original_ppl
    chat_head = " facts named | turns ended | teacher-reply ppl |" if chat else ""
    print(
        f"\n| row | WikiText-2 test perplexity | gap recovered |{chat_head}\n|---|---|---|{'---|---|---|' if chat else ''}"
    )
    for r in rows:
        start = r.get("start_perplexity", pruned_ppl)  # the untrained student this row was trained from
        gap = (start - r["perplexity"]) / (start - teacher_ppl) if "train_tokens_per_second" in r else None
        cells = (
            (
                f" {r['chat_facts']}/{r['chat_fact_questions']} | {r['chat_turns_ended']}/{r['chat_prompts']} |"
                f" {r['teacher_reply_perplexity']:.2f} |"
            )
            if chat
            else ""
        )
        print(f"| {r['row']} | {r['perplexity']:.3f} | {'' if gap is None else f'{gap * 100:.0f} %'} |{cells}")
    save(rows, complete=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
