"""A PyTorch model that holds one decoder layer at a time: the reference for models too large to load.

    model = load_streamed_model(folder)       # embeddings, final norm and head in memory; layers on disk
    model(input_ids).logits                   # each layer is read from the checkpoint as the forward
                                              # reaches it, in float32, and dropped once it has run

It is the model's own transformers class, built on the meta device, so every family's forward,
masks and rotary embeddings are the library's and `generate`, caches and hooks work as usual. Each
forward reads the layers again (from the page cache when the checkpoint fits there); a float32 8B
model would need 32 GB whole, streamed it needs its embeddings plus one layer.

Calibration (GPTQ, AWQ) holds a layer for several passes: `load_streamed_model(folder, on_demand=False)`
leaves the loading to the caller, through `load_layer` and `unload_layer`.

`load_reference_model` picks: the whole model when its float32 weights are small (fast, and what the
SmolLM2 results were measured with), streamed above `WHOLE_MODEL_LIMIT`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointReader
from pipeline.errors import StageError

WHOLE_MODEL_LIMIT = 2 * 2**30  # float32 bytes; above this the reference model is streamed


def float32_bytes(folder: Path) -> int:
    """The checkpoint's size in float32: what loading it whole costs."""
    return 4 * CheckpointReader(folder).parameters()


def load_reference_model(folder: Path, attention: str = "eager") -> torch.nn.Module:
    """The float32 model of `folder`, whole when small, else streamed layer by layer (see the module docstring)."""
    from pipeline.models import load_torch_model

    if float32_bytes(folder) <= WHOLE_MODEL_LIMIT:
        return load_torch_model(folder, attention)
    return load_streamed_model(folder, attention)


def load_streamed_model(folder: Path, attention: str = "eager", on_demand: bool = True) -> torch.nn.Module:
    """The model of a checkpoint folder with its decoder layers left on disk until a forward needs them
    (`on_demand`), or until the caller loads them with `load_layer`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models import attention_for

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not stored
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attention_for(config, attention), dtype=torch.float32
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise StageError(
            f"{folder}: {config.model_type} keeps no decoder layers at model.layers; it cannot be streamed"
        )
    reader = CheckpointReader(folder)
    for name in reader:
        if not name.startswith("model.layers."):
            _set(model, name, reader[name])
    model.tie_weights()
    model.checkpoint_reader = reader
    for i, layer in enumerate(layers if on_demand else ()):
        layer.register_forward_pre_hook(_loader(reader, f"model.layers.{i}."))
        layer.register_forward_hook(_unloader)
    resident = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith("model.layers.")]
    if resident:
        raise StageError(f"{folder}: the checkpoint holds no {resident[0]} ({len(resident)} tensors missing)")
    model.streamed_layers = len(layers)
    return model.eval()


def load_layer(model: torch.nn.Module, index: int) -> torch.nn.Module:
    """Decoder layer `index` of a streamed model, read from its checkpoint in float32; resident until unloaded."""
    layer = model.model.layers[index]
    _loader(model.checkpoint_reader, f"model.layers.{index}.")(layer, ())
    return layer


def unload_layer(model: torch.nn.Module, index: int) -> None:
    model.model.layers[index].to("meta")


def resident_layers(model: torch.nn.Module) -> list[int]:
    """The decoder layers whose weights are in memory now (tests check there is at most one)."""
    return [i for i, layer in enumerate(model.model.layers) if any(not p.is_meta for p in layer.parameters())]


def _loader(reader: CheckpointReader, prefix: str):
    def load(layer: torch.nn.Module, args) -> None:
        for name, _ in list(layer.named_parameters()):
            _set(layer, name, reader[prefix + name], prefix)

    return load


def _unloader(layer: torch.nn.Module, args, output) -> None:
    layer.to("meta")


def _set(root: torch.nn.Module, name: str, value: torch.Tensor, prefix: str = "") -> None:
    """Replace parameter `name` of `root` (a meta tensor or a real one) with `value` in float32."""
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    current = owner._parameters.get(attr)
    if current is None:
        if attr in owner._buffers:
            owner._buffers[attr] = value.to(torch.float32 if value.is_floating_point() else value.dtype)
            return
        raise StageError(f"checkpoint tensor {prefix}{name} has no place in the model")
    if tuple(current.shape) != tuple(value.shape):
        raise StageError(
            f"checkpoint tensor {prefix}{name} has shape {list(value.shape)}, the model expects {list(current.shape)}"
        )
    owner._parameters[attr] = torch.nn.Parameter(value.to(torch.float32), requires_grad=False)
