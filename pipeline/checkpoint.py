"""Checkpoint folders tensor by tensor: read one tensor at a time from safetensors shards, write one
tensor at a time into a safetensors file. A stage that streams a model through these holds one
tensor, not the model (an 8B model in float32 is 32 GB).

    CheckpointReader(folder)["model.layers.0.mlp.up_proj.weight"]   # read from its shard (memory-mapped)
    with SafetensorsWriter(path) as w: w.add(name, array)            # data appended as it comes

The writer appends each tensor's bytes to a scratch file and writes the header (which needs every
offset) when it is closed, then the data after it: memory stays at one tensor, disk holds the data
twice until the file is complete. A file is only ever complete or absent.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
           np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float64): "F64", np.dtype(np.bool_): "BOOL"}


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint folder by name, each read only when asked for."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        elif (folder / SINGLE).is_file():
            with safe_open(str(folder / SINGLE), "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}")
        self.folder, self.weight_map = folder, weight_map
        self._open = {name: safe_open(str(folder / name), "pt") for name in sorted(set(weight_map.values()))}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._open[self.weight_map[name]].get_tensor(name)


class SafetensorsWriter:
    """A safetensors file written one tensor at a time (see the module docstring)."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.scratch = self.path.with_name(f".{self.path.name}.data-{os.getpid()}")
        self.data = open(self.scratch, "wb")
        self.header: dict = {"__metadata__": metadata or {"format": "pt"}}
        self.offset = 0

    def add(self, name: str, tensor: np.ndarray | torch.Tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach().cpu()
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bytes as they are
                array, dtype = tensor.contiguous().view(torch.int16).numpy(), "BF16"
            else:
                array = tensor.contiguous().numpy()
                dtype = _DTYPES[array.dtype]
        else:
            array, dtype = tensor, _DTYPES[tensor.dtype]
        if name in self.header:
            raise ValueError(f"{self.path.name}: tensor {name} written twice")
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        self.data.write(raw)
        self.header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [self.offset, self.offset + len(raw)]}
        self.offset += len(raw)

    def close(self) -> None:
        self.data.close()
        header = json.dumps(self.header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as out, open(self.scratch, "rb") as data:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                shutil.copyfileobj(data, out, 16 * 2**20)
            os.replace(tmp, self.path)
        finally:
            self.scratch.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        self.data.close()
        self.scratch.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        self.abort() if kind is not None else self.close()
