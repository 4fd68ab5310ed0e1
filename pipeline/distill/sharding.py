"""FSDP for the distill loop (`distill.parallel: fsdp`): teacher and student split across the processes.

Under DDP every process holds the whole teacher and student on its device. With FSDP (torch's
`fully_shard`) each process keeps 1/N of every weight, and a decoder layer's weights are gathered only
while that layer runs (forward; and backward for the student), so a teacher that does not fit one GPU
can still teach. Each decoder layer is one unit; the embeddings, the final norm and the head (tied or
not) belong to the root unit. The optimizer's moments are sharded with the weights.

Only process 0 reads the teacher's weights, into CPU memory. The stage shards the teacher before
pruning, so that every process scores its layers on its device, and keeps process 0's CPU copy to
prune from (`shard(..., keep_whole=True)`); training shards the student (and the teacher when the stage
has not). The other processes build skeletons of the same shapes on the meta device (no memory), and
sharding sends each of them its share of process 0's weights, one tensor at a time. Checkpoints hold every process's
shards (torch.distributed.checkpoint, one file per process plus metadata). When training ends, the
student is gathered one tensor at a time into a plain model on process 0's CPU (the others get a
skeleton again), so the stage goes on as under DDP.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from calibration.collect import decoder_layers
from pipeline import distributed
from pipeline.configs import DistillConfig
from pipeline.errors import StageError
from pipeline.models import attention_for, load_torch_model

FOLDER = "fsdp"  # inside a checkpoint: the sharded model and optimizer


def active(cfg: DistillConfig) -> bool:
    """Whether this run shards (FSDP asked for, and more than one process)."""
    return cfg.parallel == "fsdp" and distributed.world_size() > 1


def load(path: Path, cfg: DistillConfig) -> torch.nn.Module:
    """A checkpoint's model in float32 on the CPU, or, in processes 1.. of a sharded run, its skeleton."""
    from transformers import AutoConfig

    if active(cfg) and not distributed.is_main():
        return skeleton(AutoConfig.from_pretrained(path))
    return load_torch_model(path, attention="sdpa")


def skeleton(config) -> torch.nn.Module:
    """A model of `config`'s shape on the meta device: shapes without memory, filled in by `shard`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attention_for(config, "sdpa")
        ).eval()


def shard(model: torch.nn.Module, device: torch.device, keep_whole: bool = False) -> torch.nn.Module | None:
    """Split `model` across all processes in place, with process 0's weights (the others may hold a
    skeleton): its parameters become sharded DTensors on `device`. With `keep_whole`, process 0 gets back
    a plain CPU model over the weights it had (no copy: the tensors the shards were cut from)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    whole = model.state_dict() if distributed.is_main() else {}  # references: process 0's CPU copy stays until sent
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        model.to_empty(device=device)
    # a copy of the dict: set_model_state_dict puts the sharded tensors into the one it is given
    set_model_state_dict(model, dict(whole), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # the rotary frequencies are not in the state dict
        dist.broadcast(buffer, src=0)
    return _plain(model.config, whole, assign=True) if keep_whole and distributed.is_main() else None


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module | None):
    """Inside, a sharded model's root unit (embeddings, final norm, head) is whole on every process, so its
    head weight can be read outside its own forward (the student's head computes the KD term with it).
    Does nothing for an unsharded model or None."""
    if model is None or not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def held_here(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this process holds, parameters of the model)."""
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


def gather(model: torch.nn.Module) -> torch.nn.Module:
    """A plain float32 copy of a sharded model on process 0's CPU; a skeleton in the others (all must call it)."""
    main = distributed.is_main()
    weights = {}
    for name, t in model.state_dict().items():
        # one full tensor at a time on the device, so gathering needs no more device memory than one weight
        whole = t.full_tensor() if hasattr(t, "full_tensor") else t
        if main:
            weights[name] = whole.detach().to("cpu", torch.float32)
    if not main:
        return skeleton(model.config).train(model.training)
    return _plain(model.config, weights).train(model.training)


def _plain(config, weights: dict[str, torch.Tensor], assign: bool = False) -> torch.nn.Module:
    """A float32 CPU model of `config` holding `weights` (taking the tensors themselves with `assign`)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attention_for(config, "sdpa")
        )
    plain.load_state_dict(weights, assign=assign)
    plain.tie_weights()
    return plain.eval()


def save_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shards of the model and optimizer into `folder`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, moments = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=str(folder / FOLDER))


def load_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process reads its shards back from a checkpoint written by `save_shards` (as many processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, moments = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": moments}
    reader = metadata_checked_reader(folder / FOLDER)
    reader.read_metadata()  # refused here in one line, not inside the collective load's report
    dcp.load(state, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def metadata_checked_reader(path: Path):
    """torch's checkpoint reader, except that its `.metadata` file (a pickle) may hold only the checkpoint
    format's own classes, torch sizes and dtypes: a file planted in the workdir cannot run code at resume."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            found = super().find_class(module, name)
            if module.startswith("torch.distributed.checkpoint.") and isinstance(found, type):
                return found
            if module == "torch" and (
                found is torch.Size or isinstance(found, (torch.dtype, torch.layout, torch.memory_format))
            ):
                return found
            if (module, name) in {
                ("collections", "OrderedDict"),
                ("builtins", "set"),
                ("builtins", "frozenset"),
                ("torch.serialization", "_get_layout"),  # a layout by its name
                ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"),
            }:  # where it was saved
                return found
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata_path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with open(metadata_path, "rb") as f:
                    metadata = Unpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
                raise StageError(
                    f"distill: {metadata_path} is not a checkpoint this stage wrote ({e}); delete the "
                    "checkpoint folder to start over"
                ) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))
