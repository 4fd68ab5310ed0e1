"""One recipe in several processes (`torchrun` / `accelerate launch`): which process does what.

Under a launcher every process runs the recipe. A stage registered as `distributed` (distill) runs in
all of them: each process takes its share of every batch and the gradients are averaged (DDP; or FSDP
with `distill.parallel: fsdp`, each process holding a shard of the models), while process 0 alone
writes files and logs. Every other step runs in process 0 alone; the others wait for its artifact.
Once the last distributed step is done, processes 1.. leave and process 0 finishes the recipe.

Without a launcher (WORLD_SIZE unset or 1) every function here is a no-op and the recipe runs as one
process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from pipeline.errors import PipelineError, StageError

T = TypeVar("T")

# Process 0 may run long steps (an import, a GPTQ pass) while the others wait for it in a collective;
# the default 30-minute timeout of torch.distributed would kill them first.
WAIT = timedelta(hours=48)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start() -> None:
    """Join the process group (gloo on the CPU, NCCL on GPUs, as accelerate picks) with a long timeout."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        # accelerate takes a machine without an accelerator for multi-CPU only when told so
        accelerated = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        PartialState(cpu=not accelerated, timeout=WAIT)
        cpu_threads(training=False)


def finish() -> None:
    """Leave the process group before the interpreter exits: gloo's worker threads still alive at
    interpreter teardown abort the process now and then (SIGABRT, "terminate called without an active
    exception"). Local to this process: the others go on with the group they still hold."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def device():
    """This process's accelerator as accelerate picks it (under a launcher, its own GPU), or the CPU."""
    from accelerate import PartialState

    return PartialState().device


def cpu_threads(training: bool) -> None:
    """On the CPU under a launcher (which starts each process with one thread): while the processes
    train together each takes its share of the cores; otherwise process 0 works alone while the others
    wait, so it takes them all."""
    import torch

    if world_size() == 1 or torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    torch.set_num_threads(max(1, cores // local) if training else cores)


def share(value: Any = None) -> Any:
    """Process 0's `value`, in every process (a picklable object)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` run by process 0 alone; the others get its result (or raise its error) when it is done."""
    if world_size() == 1:
        return fn()
    if is_main():
        try:
            value = fn()
        except PipelineError as e:
            share(("error", str(e)))
            raise
        share(("done", value))
        return value
    outcome, value = share()
    if outcome == "error":
        raise StageError(f"process 0 failed: {value}")
    return value
