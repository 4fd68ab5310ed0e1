"""Distill stage: hf-model (the teacher) -> a smaller hf-model (the student).

    teacher ─► width pruning (MLP channels, KV groups) ─► depth pruning (layers kept by importance)
            ─► pruned student ─► knowledge distillation on text (pipeline/distill/train.py) ─► student

With `teacher_answers`, the teacher first answers chat prompts (pipeline/distill/teacher_answers.py)
and those conversations join the training text, so the student keeps the teacher's chat turns.
With `teacher_correction`, the teacher is then fine-tuned on that text (pipeline/distill/correct.py)
and everything after (scores, pruned weights, KD targets) comes from the corrected teacher.
Calibration blocks (from the training text) score the layers, channels and heads; held-out blocks
measure the student before and during training; a few greedy chat replies of teacher and student
go in the manifest. Training checkpoints live beside the run
(`.resume-<step folder>/`) until the step completes, so a killed run resumes when re-run.

Under `torchrun` / `accelerate launch` the stage runs in every process (pipeline/distributed.py): the
trainings (correction and distillation) share each batch between them, while process 0 alone samples
the teacher's answers, scores the layers (under FSDP every process does, on the shards), evaluates and
writes; the others receive what they need.
Under FSDP (`parallel: fsdp`) only process 0 reads the teacher's weights; the others hold skeletons until
the teacher is sharded from process 0's weights (pipeline/distill/sharding.py), before pruning: then every
process scores the layers on its shards, and process 0 prunes from its CPU copy.

After the teacher's answers are sampled (from an ONNX export of it), the teacher moves to the device the
training will use (each process its own GPU; the CPU here), so scoring, statistics, evaluations and
replies run there. Under FSDP it may not fit one device: process 0 keeps its CPU copy for pruning, the
statistics and the first evaluations, and the layers are scored on the shards.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from calibration import DataError, load_text, sample_blocks
from calibration.prompts import builtin_prompts, load_prompts
from pipeline import distributed
from pipeline.artifacts import write_json_atomic
from pipeline.configs import DistillConfig, TextSourceConfig
from pipeline.distill import head_loss, sharding
from pipeline.distill.correct import correct_teacher
from pipeline.distill.prune import (
    choose_layers,
    layer_importance,
    layers_for_budget,
    mean_loss,
    prune_depth,
    prune_kv_groups,
    prune_mlp,
)
from pipeline.distill.teacher_answers import conversations_stream, sample_replies, teacher_answers
from pipeline.distill.train import evaluate, train
from pipeline.errors import StageError
from pipeline.models import copy_tokenizer, save_pretrained
from pipeline.registry import StageResult, register_stage
from runtime.tokenizer import Tokenizer

ANSWERS_FILE = "teacher_answers.jsonl"
REPLY_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in simple terms.",
)


@register_stage("distill", DistillConfig, consumes="hf-model", produces="hf-model", distributed=True)
def distill(cfg: DistillConfig, inp, ctx) -> StageResult:
    teacher = sharding.load(inp.path, cfg)
    head_loss.check_family(teacher.config)  # before any scoring or sampling, not after
    teacher_layers = teacher.config.num_hidden_layers
    checkpoints = ctx.run_dir / f".resume-{ctx.step or 'distill'}"
    main = distributed.is_main()
    answers = None
    if cfg.teacher_answers:
        answers = distributed.on_main(lambda: _teacher_answers(cfg, teacher, inp.path, checkpoints, ctx.log))
    train_blocks, eval_blocks = _data(cfg, Tokenizer(inp.path), answers)
    # The forward passes below (perplexities, layer scores, channel statistics, replies) run where training
    # will: on this process's GPU when there is one, which holds the teacher during training anyway.
    # Under FSDP the teacher may not fit one device, so process 0 keeps it in CPU memory.
    device = None if sharding.active(cfg) else distributed.device()
    if device is not None:
        teacher.to(device)
    # what only the manifest needs is measured by process 0 alone
    teacher_ppl = math.exp(mean_loss(teacher, eval_blocks)) if main else math.nan
    teacher_replies = sample_replies(teacher, inp.path, REPLY_PROMPTS) if main else []
    correction = None
    if cfg.teacher_correction is not None:
        teacher, correction = correct_teacher(teacher, train_blocks, eval_blocks, cfg, checkpoints, ctx.log)
        if device is not None:  # one read back from an interrupted run's checkpoint is in CPU memory
            teacher.to(device)
        ctx.log(f"  held-out perplexity: teacher {teacher_ppl:.3f}, corrected {correction['heldout_perplexity']:.3f}")
    calib = torch.from_numpy(
        sample_blocks(train_blocks.numpy().reshape(-1), cfg.sequence_length, cfg.importance_samples, cfg.seed)
    )
    ctx.log(f"  {len(train_blocks)} training blocks of {cfg.sequence_length} tokens, {len(eval_blocks)} held out")

    whole = teacher  # the teacher's weights in this process's memory, to prune and to evaluate the pruned student
    if sharding.active(cfg):
        # The teacher is split across the processes' devices now, and every process scores its layers on the
        # same blocks (each forward needs all of them); process 0 alone keeps the whole weights, in CPU
        # memory, to prune from; the others take the student's shape.
        whole = sharding.shard(teacher, distributed.device(), keep_whole=True)
        scores = distributed.share(_scores(cfg, teacher, calib, ctx.log, lambda score: score()))
        teacher.reshard()  # its forwards leave the root unit (embeddings, head) gathered
        pruned = {}

        def prune_on_main():
            pruned["student"], keep = _prune(cfg, whole, calib, scores)
            return keep, pruned["student"].config

        keep, config = distributed.on_main(prune_on_main)
        student = pruned["student"] if main else sharding.skeleton(config)
    else:  # every process prunes its copy alike; one scores the layers, so that all keep the same ones
        scores = _scores(cfg, teacher, calib, ctx.log, distributed.on_main)
        student, keep = _prune(cfg, teacher, calib, scores)
    layer_map = _layer_map(cfg, keep, teacher_layers)
    params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    ctx.log(
        f"  student: layers {keep} of {teacher_layers}, {params / 1e6:.1f}M parameters (teacher {teacher_params / 1e6:.1f}M)"
    )

    pruned_ppl, pruned_kl = evaluate(student, whole, eval_blocks) if main else (math.nan, math.nan)
    whole = None  # under FSDP, process 0's CPU copy is not needed for training
    ctx.log(f"  held-out perplexity: teacher {teacher_ppl:.3f}, pruned student {pruned_ppl:.3f}")
    started = time.time()
    student, history = train(student, teacher, train_blocks, eval_blocks, layer_map, cfg, checkpoints, ctx.log)
    if not main:
        return StageResult()
    final_ppl, final_kl = history.eval_ppl[-1], history.eval_kl[-1]

    save_pretrained(student, ctx.out_dir)
    copy_tokenizer(inp.path, ctx.out_dir)
    replies = [
        {"prompt": p, "teacher": t, "student": s}
        for p, t, s in zip(REPLY_PROMPTS, teacher_replies, sample_replies(student, inp.path, REPLY_PROMPTS))
    ]
    for r in replies:
        ctx.log(f"  {r['prompt']!r} -> student: {r['student'][:120]!r}")
    if answers is not None:  # the step folder appears only once complete: a plain write is enough
        (ctx.out_dir / ANSWERS_FILE).write_text(
            "".join(json.dumps({"prompt": a["prompt"], "answer": a["answer"], "ids": a["ids"]}) + "\n" for a in answers)
        )
    _plot(
        history,
        pruned_ppl,
        teacher_ppl,
        ctx.out_dir / "training.png",
        correction["heldout_perplexity"] if correction else None,
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
    # the gap opened below the teacher the stage was given, also when a corrected teacher was imitated
    recovered = (pruned_ppl - final_ppl) / (pruned_ppl - teacher_ppl) if pruned_ppl > teacher_ppl else 1.0
    corrected = {"corrected_teacher_perplexity": correction["heldout_perplexity"]} if correction else {}
    return StageResult(
        metrics={
            "teacher_perplexity": teacher_ppl,
            **corrected,
            "pruned_perplexity": pruned_ppl,
            "perplexity": final_ppl,
            "gap_recovered": recovered,
            "kl_to_teacher": final_kl,
            "pruned_kl_to_teacher": pruned_kl,
            "parameters": params,
            "teacher_parameters": teacher_params,
            "layers": len(keep),
            "tokens_seen": history.tokens_seen,
            "processes": distributed.world_size(),
            "teacher_answers": len(answers) if answers is not None else 0,
            "train_tokens_per_second": history.tokens_seen / max(history.train_seconds, 1e-9),
            "wall_seconds": time.time() - started,
        },
        info={
            "teacher": {
                "artifact": str(inp.path),
                "fingerprint": inp.fingerprint,
                "model_type": teacher.config.model_type,
                "layers": teacher_layers,
            },
            "pruning": {
                "kept_layers": keep,
                "layer_choice": cfg.layer_choice,
                "layer_scores": scores,
                "intermediate_size": student.config.intermediate_size,
                "num_key_value_heads": student.config.num_key_value_heads,
            },
            "teacher_correction": correction,
            "layer_map": {str(k): v for k, v in layer_map.items()},
            "training": history.__dict__,
            "sample_replies": replies,
        },
    )


def _scores(cfg: DistillConfig, teacher, calib: torch.Tensor, log, run) -> list[float] | None:
    """The teacher's layer scores for `cfg.layer_choice` (None when layers are kept uniformly); `run(fn)` runs
    the scoring `fn` (in process 0 alone, or in every process on a sharded teacher)."""
    if cfg.layer_choice == "uniform":
        return None
    log(
        f"  scoring {teacher.config.num_hidden_layers} layers ({cfg.layer_choice}) on {cfg.importance_samples} "
        "calibration blocks"
    )
    return run(lambda: layer_importance(teacher, calib, cfg.layer_choice))


def _prune(
    cfg: DistillConfig, teacher, calib: torch.Tensor, scores: list[float] | None
) -> tuple[torch.nn.Module, list[int]]:
    """The pruned student and the teacher layers it keeps (by `scores`, or uniformly when None)."""
    teacher_layers = teacher.config.num_hidden_layers
    student = teacher
    if cfg.intermediate_size is not None or cfg.num_key_value_heads is not None:
        import copy

        student = copy.deepcopy(teacher)
        if cfg.intermediate_size is not None:
            prune_mlp(student, cfg.intermediate_size, calib)
        if cfg.num_key_value_heads is not None:
            prune_kv_groups(student, cfg.num_key_value_heads, calib)
    if cfg.num_layers is not None:
        layers = cfg.num_layers
    elif cfg.keep_fraction is not None:
        layers = max(1, round(cfg.keep_fraction * teacher_layers))
    else:
        layers = layers_for_budget(student, cfg.param_budget_m)
    keep = choose_layers(teacher_layers, layers, cfg.layer_choice, scores)
    return prune_depth(student, keep), keep


def _teacher_answers(cfg: DistillConfig, teacher, teacher_folder: Path, checkpoints: Path, log) -> list[dict]:
    """The teacher's chat turns (sequence-level KD data); kept beside the training checkpoints, so a
    resumed run trains on the very answers the killed one generated."""
    saved = checkpoints / "teacher_answers.json"
    if saved.is_file():
        answers = json.loads(saved.read_text())
        log(f"  teacher answers: {len(answers)} read from the interrupted run")
        return answers
    ta = cfg.teacher_answers
    try:
        if ta.prompts is None:
            first = cfg.train_data[0]
            passages = load_text(first.source, first.split, first.hub_config, first.text_field)
            prompts = builtin_prompts(ta.samples, cfg.seed, passages)
        else:
            p = ta.prompts
            prompts = load_prompts(p.source, p.split, p.text_field, ta.samples, cfg.seed, p.hub_config)
    except DataError as e:
        raise StageError(f"distill.teacher_answers.prompts: {e}") from e
    answers = teacher_answers(teacher, teacher_folder, checkpoints / "teacher-onnx", prompts, ta, cfg.seed, log)
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, answers)
    return answers


def _data(
    cfg: DistillConfig, tokenizer: Tokenizer, answers: list[dict] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training blocks from the head of each training text (the teacher's conversations count as one);
    held-out blocks from their tails (or eval_data)."""
    streams = [_tokens(source, tokenizer, f"distill.train_data[{i}]") for i, source in enumerate(cfg.train_data)]
    if answers is not None:
        streams.append(conversations_stream(answers))
    held = _tokens(cfg.eval_data, tokenizer, "distill.eval_data") if cfg.eval_data is not None else None
    return split_blocks(streams, cfg, held)


def split_blocks(
    streams: list[np.ndarray], cfg: DistillConfig, held: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams -> training blocks from the head of each, held-out blocks from their tails (or from `held`)."""
    train_parts, heldout_parts = [], []
    for ids in streams:
        cut = int(len(ids) * (1 - cfg.heldout_fraction)) if held is None else len(ids)
        train_parts.append(_blocks(ids[:cut], cfg.sequence_length))
        heldout_parts.append(ids[cut:])
    train_blocks = np.concatenate(train_parts)
    if len(train_blocks) < cfg.batch_size:
        raise StageError(
            f"distill.train_data: {len(train_blocks)} blocks of {cfg.sequence_length} tokens, fewer than "
            f"one batch of {cfg.batch_size}; give more text or lower sequence_length/batch_size"
        )
    held = np.concatenate(heldout_parts) if held is None else held
    eval_blocks = _blocks(held, cfg.sequence_length)[: cfg.eval_samples]
    if len(eval_blocks) == 0:
        raise StageError(
            f"distill: the held-out text has {len(held)} tokens, fewer than one block of "
            f"{cfg.sequence_length}; raise heldout_fraction or give eval_data"
        )
    return torch.from_numpy(train_blocks), torch.from_numpy(eval_blocks)


def _tokens(source: TextSourceConfig, tokenizer: Tokenizer, key: str) -> np.ndarray:
    try:
        text = load_text(source.source, source.split, source.hub_config, source.text_field)
    except DataError as e:
        raise StageError(f"{key}: {e}") from e
    return np.array(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)


def _blocks(ids: np.ndarray, length: int) -> np.ndarray:
    n = len(ids) // length
    return ids[: n * length].reshape(n, length)


def _layer_map(cfg: DistillConfig, keep: list[int], teacher_layers: int) -> dict[int, int]:
    """Student layer -> teacher layer for the hidden-state loss; by default each layer's origin."""
    if cfg.loss.layer_map is None:
        return dict(enumerate(keep))
    out = {}
    for student_layer, teacher_layer in cfg.loss.layer_map.items():
        s = int(student_layer)
        if s >= len(keep):
            raise StageError(f"distill.loss.layer_map.{student_layer}: the student has layers 0..{len(keep) - 1}")
        if not 0 <= teacher_layer < teacher_layers:
            raise StageError(
                f"distill.loss.layer_map.{student_layer}: teacher layer {teacher_layer} does not exist "
                f"(the teacher has layers 0..{teacher_layers - 1})"
            )
        out[s] = teacher_layer
    return out


def _plot(history, pruned_ppl: float, teacher_ppl: float, path, corrected_ppl: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(history.steps, history.loss, lw=1)
    loss_ax.set(xlabel="step", ylabel="training loss", title="distillation loss")
    ppl_ax.plot([0] + history.eval_steps, [pruned_ppl] + history.eval_ppl, marker="o", label="student")
    ppl_ax.axhline(teacher_ppl, color="gray", ls="--", label="teacher")
    if corrected_ppl is not None:
        ppl_ax.axhline(corrected_ppl, color="gray", ls=":", label="corrected teacher")
    ppl_ax.set(xlabel="step", ylabel="held-out perplexity", title="evaluation")
    ppl_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
