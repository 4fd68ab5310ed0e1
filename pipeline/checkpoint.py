"""Checkpoint folders tensor by tensor: read one tensor at a time from safetensors shards, write one
tensor at a time into a safetensors file. A stage that streams a model through these holds one
tensor, not the model (an 8B model in float32 is 32 GB).

    CheckpointReader(folder)["model.layers.0.mlp.up_proj.weight"]   # read from its shard
    with SafetensorsWriter(path) as w: w.add(name, array)            # data appended as it comes

The writer appends each tensor's bytes to a scratch file and writes the header (which needs every
offset) when it is closed, then the data after it: memory stays at one tensor, disk holds the data
twice until the file is complete. A file is only ever complete or absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

INDEX = "model.safetensors.index.json"
_TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
SINGLE = "model.safetensors"
_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.float64): "F64",
    np.dtype(np.bool_): "BOOL",
}


def read_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's tensor table (name -> dtype, shape, data offsets) and where its data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint folder by name, each read only when asked for.

    Tensors are read with plain file reads, not through a memory map: a mapped shard's pages count
    as this process's resident memory once touched, so streaming a model through a map would end
    with the whole checkpoint in its RSS."""

    def __init__(self, folder: Path, extra: tuple[str, ...] = ()):
        folder = Path(folder)
        if (folder / INDEX).is_file():
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        elif (folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}")
        files += [name for name in extra if (folder / name).is_file()]
        self.folder = folder
        self.entries: dict[str, tuple[str, int, dict]] = {}  # name -> (file, data start, header entry)
        for name in files:
            start, header = read_header(folder / name)
            for key, entry in header.items():
                self.entries[key] = (name, start, entry)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def parameters(self) -> int:
        """How many numbers the checkpoint holds, from its headers (no tensor is read)."""
        return sum(math.prod(entry["shape"]) for _, _, entry in self.entries.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        file, start, entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.folder / file, "rb") as f:
            f.seek(start + begin)
            f.readinto(buffer)
        dtype = _TORCH_DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


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
        self.header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [self.offset, self.offset + len(raw)],
        }
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

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        self.abort() if kind is not None else self.close()


class FloatWeights:
    """A checkpoint's tensors as numpy arrays, each read when asked for (the graph builders' weights), with the
    quantize stage's packed codes and scales read beside them: floats in float32, integers as stored; `dtype`
    is the type stored (bfloat16, which numpy lacks, as float32)."""

    def __init__(self, folder: Path):
        from pipeline.quant.plan import PACKED_FILE

        self.reader = CheckpointReader(folder, extra=(PACKED_FILE,))

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def __iter__(self):
        return iter(self.reader)

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self.reader[name]
        return tensor.to(torch.float32).numpy() if tensor.is_floating_point() else tensor.numpy()

    def shape(self, name: str) -> list[int]:
        return list(self.reader.entries[name][2]["shape"])

    def dtype(self, name: str) -> np.dtype:
        dtype = self.reader.entries[name][2]["dtype"]
        return np.dtype(np.float32) if dtype == "BF16" else next(k for k, v in _DTYPES.items() if v == dtype)


class ModelWeights(dict):
    """An in-memory model's tensors in FloatWeights' place (tests, models built in memory)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__({k: v.detach().float().numpy() for k, v in model.state_dict().items()})

    def shape(self, name: str) -> list[int]:
        return list(self[name].shape)


class ShardedWriter:
    """A checkpoint folder written one tensor at a time into shards of at most `shard_bytes`, named and indexed
    as Hugging Face names them (a single shard is model.safetensors). Each shard is a SafetensorsWriter, so the
    disk holds at most one shard's data twice while writing."""

    def __init__(self, folder: Path, shard_bytes: int = 5 * 10**9):
        self.folder, self.limit = Path(folder), shard_bytes
        self.shards: list[Path] = []
        self.current: SafetensorsWriter | None = None
        self.weight_map: dict[str, int] = {}
        self.total = 0

    def add(self, name: str, tensor: np.ndarray | torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else tensor.nbytes
        if self.current is None or (self.current.offset and self.current.offset + size > self.limit):
            if self.current is not None:
                self.current.close()
            self.shards.append(self.folder / f".shard-{len(self.shards) + 1}.safetensors")
            self.current = SafetensorsWriter(self.shards[-1])
        self.current.add(name, tensor)
        self.weight_map[name] = len(self.shards) - 1
        self.total += size

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        if len(self.shards) == 1:
            os.replace(self.shards[0], self.folder / SINGLE)
            return
        names = [f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]
        for shard, name in zip(self.shards, names):
            os.replace(shard, self.folder / name)
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {k: names[i] for k, i in self.weight_map.items()},
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
        for shard in self.shards:
            shard.unlink(missing_ok=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        self.abort() if kind is not None else self.close()
