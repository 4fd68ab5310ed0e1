"""The distillation loop, run through Hugging Face accelerate.

One process on the CPU here; the same code under `accelerate launch` / `torchrun` trains with DDP, or
with FSDP (`parallel: fsdp`, pipeline/distill/sharding.py: teacher and student split across the
processes): each process takes `batch_size` blocks of every micro-batch, so a step reads batch_size ×
grad_accum × processes blocks and the token budget takes fewer steps. Deterministic: the block order of each epoch is a
permutation seeded by (seed, epoch), so step k always sees the same data, and a run resumed from a
checkpoint continues exactly where the killed one was.

    for each step:  teacher(ids) ─► logits_t, hidden_t          (no grad)
                    student(ids) ─► logits_s, hidden_s
                    loss = kd·KD(s, t; T) + ce·CE(s, ids) + hidden·Σ H(s_i, t_map(i))
                    (KD and CE inside the student's head, chunk by chunk: pipeline/distill/head_loss.py)
                    AdamW, warm-up then cosine, gradient clipping, accumulation
    every eval_every steps: held-out perplexity of the student and its KL to the teacher
    every checkpoint_every steps: accelerate's state (model in safetensors; optimizer and RNG read back with
    torch.load(weights_only=True)) + progress.json (step, history, the LR schedule: nothing is unpickled)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.bench.system import rss_bytes
from pipeline.configs import DistillConfig
from pipeline.distill import head_loss, sharding
from pipeline.distill.losses import hidden_loss
from pipeline.errors import StageError

PROGRESS_FILE = "progress.json"


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_ppl: list[float] = field(default_factory=list)
    eval_kl: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    student_parameters_held: int = 0  # by each process: all of them, or its shard under FSDP
    teacher_parameters_held: int = 0
    start_rss_mib: list[float] = field(default_factory=list)  # per process, models in place, before the first step
    peak_rss_mib: list[float] = field(default_factory=list)  # per process, when training ended
    peak_device_mib: list[float] = field(default_factory=list)  # per process, on a GPU


def total_steps(cfg: DistillConfig, processes: int = 1) -> int:
    return max(1, cfg.tokens // (cfg.batch_size * cfg.grad_accum * processes * cfg.sequence_length))


def batch_indices(
    step: int, micro: int, n_blocks: int, cfg: DistillConfig, rank: int = 0, world: int = 1
) -> np.ndarray:
    """Block indices of micro-batch `micro` of `step`: epoch-wise seeded permutations, sharded by rank."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    start = step * per_step + micro * cfg.batch_size * world + rank * cfg.batch_size
    out = []
    for position in range(start, start + cfg.batch_size):
        epoch, offset = divmod(position, n_blocks)
        out.append(np.random.default_rng([cfg.seed, epoch]).permutation(n_blocks)[offset])
    return np.array(out)


def _schedule(cfg: DistillConfig, steps: int) -> Callable[[int], float]:
    warmup = max(1, int(cfg.warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _mixed_precision(cfg: DistillConfig) -> str:
    """bf16 autocast (float32 master weights) where the hardware computes bf16 natively: a GPU that
    supports it, or a CPU with AVX512-BF16 or AMX (2.1x the float32 step on this machine's EPYC)."""
    if cfg.bf16 != "auto":
        return "bf16" if cfg.bf16 == "true" else "no"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = [
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return "bf16" if any(native) else "no"


def train(
    student,
    teacher,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    layer_map: dict[int, int],
    cfg: DistillConfig,
    checkpoints: Path,
    log: Callable[[str], None],
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.nn.Module, History]:
    """The trained student and its history; resumes from `checkpoints` when it holds a finished checkpoint.

    Under DDP (or alone) the student is trained in place and returned; under FSDP the student and the
    teacher (skeletons outside process 0) are sharded in place, and the student returned is a plain copy
    gathered from the shards in process 0, a skeleton in the others."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from tqdm import tqdm

    head_loss.check_family(student.config)
    set_seed(cfg.seed)
    precision = _mixed_precision(cfg)
    # accelerate keeps one state per process; a second training in the same process (another stage
    # run, a benchmark row) may want another precision. The process group itself is kept.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # their plugins wrap the model in prepare(); we shard it ourselves (and the teacher with it)
        raise StageError(
            f"distill: accelerate's {accelerator.distributed_type.value} plugin is not used; set "
            "distill.parallel: fsdp and launch with `torchrun` or `accelerate launch --multi_gpu`"
        )
    fsdp = sharding.active(cfg)
    mode = "FSDP" if fsdp else "DDP" if accelerator.num_processes > 1 else "one process"
    log(
        f"  training on {accelerator.device} ({accelerator.num_processes} process(es), {mode}), mixed precision: {precision}"
    )
    steps = total_steps(cfg, accelerator.num_processes)
    student.requires_grad_(True)  # a student copied from a frozen model would otherwise not train
    if fsdp:
        for model in (student, teacher):
            if not sharding.is_sharded(model):  # the stage shards the teacher itself, to score layers with it
                sharding.shard(model, accelerator.device)
    (s_here, s_all), (t_here, t_all) = sharding.held_here(student), sharding.held_here(teacher)
    if fsdp:
        log(
            f"  FSDP: each process holds {s_here / 1e6:.2f}M of the student's {s_all / 1e6:.2f}M parameters "
            f"and {t_here / 1e6:.2f}M of the teacher's {t_all / 1e6:.2f}M"
        )
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps))
    if not fsdp:  # DDP wrapping; the sharded model and its optimizer are checkpointed by sharding.save_shards
        student, optimizer = accelerator.prepare(student, optimizer)
        # prepare() also wraps the student's forward in autocast; the loop autocasts itself, and without
        # the wrapper the evaluations (and whoever runs the returned student) compute in float32
        accelerator.unwrap_model(student, keep_fp32_wrapper=False)
        teacher = teacher.to(accelerator.device)
    teacher.eval()  # read under no_grad only: its own flags stay as they are

    history, start = History(), 0
    state = latest_checkpoint(checkpoints)
    if state is not None:
        saved = json.loads((state / PROGRESS_FILE).read_text())
        written = (saved.get("processes", 1), saved.get("fsdp", False))
        if written != (accelerator.num_processes, fsdp):
            # rank r's blocks depend on the world size, and sharded checkpoints on the sharding
            raise StageError(
                f"distill: the checkpoint in {state} was written by {written[0]} process(es)"
                f"{' with FSDP' if written[1] else ''}, this run has {accelerator.num_processes}"
                f"{' with FSDP' if fsdp else ''}; resume the same way, or delete {checkpoints} to start over"
            )
        accelerator.load_state(str(state))  # safetensors, and torch.load with weights_only for the rest
        scheduler.load_state_dict(saved["scheduler"])  # kept in progress.json: a registered object would be unpickled
        if fsdp:
            sharding.load_shards(student, optimizer, state)
        history, start = History(**saved["history"]), saved["step"]
        log(f"  resuming from the checkpoint at step {start} of {steps}")
    history.student_parameters_held, history.teacher_parameters_held = s_here, t_here
    history.start_rss_mib = [round(x, 1) for x in _per_process(accelerator, rss_bytes() / 2**20)]

    distributed.cpu_threads(training=True)  # a launched run that fails here ends, so no restore on errors
    need_hidden = cfg.loss.hidden > 0
    terms = head_loss.Terms(kd=cfg.loss.kd, ce=cfg.loss.ce, temperature=cfg.loss.temperature)
    plain_student = student if fsdp else accelerator.unwrap_model(student)  # the module whose head computes the loss
    teacher_head = teacher.get_output_embeddings()
    need_teacher = cfg.loss.kd > 0 or need_hidden  # cross-entropy alone (teacher correction) reads only the text
    n_blocks = len(train_blocks)
    bar = tqdm(total=steps, initial=start, desc="distill", unit="step", disable=not accelerator.is_main_process)
    last_good = start
    for step in range(start, steps):
        began = time.perf_counter()
        student.train()
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            rows = batch_indices(step, micro, n_blocks, cfg, accelerator.process_index, accelerator.num_processes)
            ids = train_blocks[torch.from_numpy(rows)].to(accelerator.device)
            with accelerator.accumulate(student):
                with accelerator.autocast():
                    t_out = None
                    if need_teacher:
                        with torch.no_grad(), head_loss.returning_hidden(teacher):
                            t_out = teacher(input_ids=ids, output_hidden_states=need_hidden, use_cache=False)
                    # the student's head computes the KD and CE terms itself, a chunk of positions at a time
                    teacher_final = t_out.logits if terms.kd else None
                    with (
                        sharding.unsharded(teacher if terms.kd else None),
                        head_loss.returning_loss(
                            plain_student, head_loss.next_token_targets(ids), terms, teacher_final, teacher_head
                        ),
                    ):
                        s_out = student(input_ids=ids, output_hidden_states=need_hidden, use_cache=False)
                    loss = _loss(s_out, t_out, layer_map, cfg)
                bad = _nonfinite(accelerator, loss)
                if bad:
                    raise StageError(
                        f"distill: the loss is {bad} at step {step + 1}; the last good checkpoint (step {last_good}) "
                        f"is kept in {checkpoints}; lower distill.lr or check the data"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the last micro-batch of the step
                    if cfg.max_grad_norm:  # DTensor-aware: on FSDP shards the norm spans every process
                        accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            step_loss += float(loss.detach()) / cfg.grad_accum
        seconds = time.perf_counter() - began
        tokens = cfg.batch_size * cfg.grad_accum * cfg.sequence_length * accelerator.num_processes
        history.steps.append(step + 1)
        history.loss.append(step_loss)
        history.tokens_seen += tokens
        history.train_seconds += seconds
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / seconds:.0f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == steps:
            # every process evaluates (under FSDP each forward needs all of them)
            ppl, kl = evaluate(accelerator.unwrap_model(student), teacher, eval_blocks, cfg.loss.temperature)
            history.eval_steps.append(done)
            history.eval_ppl.append(ppl)
            history.eval_kl.append(kl)
            log(f"  step {done}/{steps}: held-out perplexity {ppl:.3f}, KL to the teacher {kl:.4f}")
        if done % cfg.checkpoint_every == 0 or done == steps:
            _checkpoint(accelerator, checkpoints, done, history, scheduler, (student, optimizer) if fsdp else None)
            last_good = done
        if on_step:
            on_step(done)
    bar.close()
    distributed.cpu_threads(training=False)
    _record_peak_memory(accelerator, history)
    return (sharding.gather(student) if fsdp else accelerator.unwrap_model(student)), history


def _record_peak_memory(accelerator, history: History) -> None:
    """Every process's peak resident memory (and device memory on a GPU) so far, in the history."""
    history.peak_rss_mib = [round(x, 1) for x in _per_process(accelerator, rss_bytes(peak=True) / 2**20)]
    if torch.cuda.is_available():
        device = _per_process(accelerator, torch.cuda.max_memory_allocated() / 2**20)
        history.peak_device_mib = [round(x, 1) for x in device]


def _per_process(accelerator, value: float) -> list[float]:
    """`value` of every process, in process order (all must call it)."""
    values = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.gather(values)
    return values.tolist()


def _nonfinite(accelerator, loss: torch.Tensor) -> str:
    """'' when every process's loss is finite, else which are not: all processes stop at the same
    micro-batch, before a NaN reaches the averaged gradients."""
    bad = [(i, v) for i, v in enumerate(_per_process(accelerator, float(loss.detach()))) if not math.isfinite(v)]
    if accelerator.num_processes == 1:
        return str(bad[0][1]) if bad else ""
    return ", ".join(f"{v} in process {i}" for i, v in bad)


def _loss(s_out, t_out, layer_map: dict[int, int], cfg: DistillConfig) -> torch.Tensor:
    """The step's loss: the weighted KD and CE terms the student's head computed (head_loss), plus the
    hidden-state term."""
    w = cfg.loss
    loss = s_out.logits[0]
    if w.hidden:
        # hidden_states[l + 1] is layer l's output
        terms = [
            hidden_loss(s_out.hidden_states[s + 1], t_out.hidden_states[t + 1], w.hidden_loss)
            for s, t in layer_map.items()
        ]
        loss = loss + w.hidden * torch.stack(terms).mean()
    return loss


@torch.no_grad()
def evaluate(student, teacher, blocks: torch.Tensor, temperature: float = 1.0) -> tuple[float, float]:
    """Held-out perplexity of the student and its KL to the teacher (temperature 1) on blocks [N, T]."""
    was_training = student.training
    student.eval()
    terms, teacher_head = head_loss.Terms(kd=1.0, ce=1.0, temperature=1.0), teacher.get_output_embeddings()
    nll = kl = 0.0
    for i in range(0, len(blocks), 4):
        ids = blocks[i : i + 4].to(next(student.parameters()).device)
        with head_loss.returning_hidden(teacher):
            t_final = teacher(input_ids=ids, use_cache=False).logits
        with (
            sharding.unsharded(teacher),
            head_loss.returning_loss(student, head_loss.next_token_targets(ids), terms, t_final, teacher_head),
        ):
            _, kd, ce = student(input_ids=ids, use_cache=False).logits
        nll += float(ce) * len(ids)
        kl += float(kd) * len(ids)
    student.train(was_training)
    return math.exp(nll / len(blocks)), kl / len(blocks)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: `state`, or `state.old` if a kill fell between the two renames."""
    for name in ("state", "state.old"):
        if (folder / name / PROGRESS_FILE).is_file():
            return folder / name
    return None


def _checkpoint(accelerator, folder: Path, step: int, history: History, scheduler, sharded=None) -> None:
    """Write the state and its progress.json to a temp folder, then swap it in: a kill at any moment
    leaves one complete checkpoint. Every process saves its part (its random state; under FSDP, given
    `sharded` = (model, optimizer), its shards); process 0 writes progress.json and swaps."""
    tmp, state, old = folder / "state.tmp", folder / "state", folder / "state.old"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if sharded is not None:
        sharding.save_shards(*sharded, tmp)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    progress = {
        "step": step,
        "processes": accelerator.num_processes,
        "fsdp": sharded is not None,
        "history": history.__dict__,
        "scheduler": scheduler.state_dict(),
    }
    (tmp / PROGRESS_FILE).write_text(json.dumps(progress))
    shutil.rmtree(old, ignore_errors=True)
    if state.exists():
        state.rename(old)
    tmp.rename(state)
    shutil.rmtree(old, ignore_errors=True)
