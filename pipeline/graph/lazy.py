"""Graph weights that stay in the checkpoint until the graph is saved.

The graph builders do not copy weights into the ONNX proto. Each weight initializer is a placeholder
that names where its values come from:

    TensorProto(name="model.layers.0.mlp.up_proj.weight.T", dims=[K, N], data_location=EXTERNAL,
                external_data={"location": "lazy:checkpoint", "parts": '[["model.layers.0.mlp.up_proj.weight", true]]'})

parts are checkpoint tensors (transposed when flagged) concatenated along `axis` (packed siblings);
the proto's data_type is the type written (a float16 graph converts as it writes). Rewrites compare
placeholders by what they name, not by value, and `save_streamed` writes the graph's data file one
tensor at a time: a graph of any size is built and saved holding one weight, not the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import StageError

LAZY = "lazy:checkpoint"
ALIGN, ALIGN_ABOVE = 65536, 2**20  # large tensors start on a 64 KiB boundary, so ONNX Runtime can map them
INLINE_BELOW = 1024  # bytes; smaller tensors stay in the proto


def lazy_tensor(
    name: str, parts: list[tuple[str, bool]], shape: list[int], axis: int = 0, dtype: np.dtype = np.dtype(np.float32)
) -> TensorProto:
    """A placeholder for checkpoint tensors `parts` (name, transposed) concatenated along `axis`, reshaped to
    `shape`, of type `dtype`."""
    t = TensorProto(
        name=name,
        data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
        dims=shape,
        data_location=TensorProto.EXTERNAL,
    )
    for key, value in (("location", LAZY), ("parts", json.dumps(parts)), ("axis", str(axis))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def is_lazy(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == LAZY for e in t.external_data
    )


def lazy_parts(t: TensorProto) -> tuple[list[tuple[str, bool]], int]:
    entries = {e.key: e.value for e in t.external_data}
    return [(name, bool(flag)) for name, flag in json.loads(entries["parts"])], int(entries["axis"])


def concat_lazy(name: str, tensors: list[TensorProto], axis: int) -> TensorProto:
    """One placeholder for `tensors` (placeholders of one type) side by side along `axis`."""
    parts = [p for t in tensors for p in lazy_parts(t)[0]]
    if any(lazy_parts(t)[1] != axis for t in tensors if len(lazy_parts(t)[0]) > 1):
        raise StageError(f"export: {name} concatenates packed weights along different axes")
    shape = list(tensors[0].dims)
    shape[axis] = sum(t.dims[axis] for t in tensors)
    out = lazy_tensor(name, parts, shape, axis)
    out.data_type = tensors[0].data_type
    return out


def tensor_array(t: TensorProto, weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """The values of an initializer, placeholder or not, in its own data type."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    if weights is None:
        raise StageError(f"export: {t.name} is still in the checkpoint and no checkpoint was given to read it from")
    parts, axis = lazy_parts(t)
    arrays = [weights[name].T if transposed else weights[name] for name, transposed in parts]
    array = (arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)).reshape(tuple(t.dims))
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    if dtype == np.float16 and array.dtype != np.float16 and np.abs(array).max(initial=0) > np.finfo(np.float16).max:
        raise StageError(f"export: {t.name} holds values beyond float16's range; use dtype: float32")
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def materialize(model: onnx.ModelProto, weights: Mapping[str, np.ndarray] | None) -> onnx.ModelProto:
    """Every placeholder replaced by its values, in place (a graph small enough to hold, e.g. for a session
    built from bytes)."""
    for t in model.graph.initializer:
        if is_lazy(t):
            t.CopyFrom(numpy_helper.from_array(tensor_array(t, weights), t.name))
    return model


def save_streamed(
    model: onnx.ModelProto, path: Path, weights: Mapping[str, np.ndarray] | None, external_data: bool = True
) -> None:
    """Save `model` with its large initializers in `<name>.data`, written one at a time (placeholders read
    from `weights` as they are written). The in-memory proto keeps only references afterwards."""
    path = Path(path)
    if not external_data:
        materialize(model, weights)
        onnx.save_model(model, str(path))
        return
    data_name = path.name + ".data"
    tmp = path.with_name(f".{data_name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as data:
            for t in model.graph.initializer:
                if not is_lazy(t) and t.data_location == TensorProto.EXTERNAL:
                    raise StageError(
                        f"export: {t.name} points at another data file; load the graph with its data to resave it"
                    )
                if not is_lazy(t) and _nbytes(t) < INLINE_BELOW:
                    continue
                raw = tensor_array(t, weights).tobytes() if is_lazy(t) else _raw(t)
                if len(raw) >= ALIGN_ABOVE:
                    data.write(b"\0" * (-data.tell() % ALIGN))
                offset = data.tell()
                data.write(raw)
                _point_to(t, data_name, offset, len(raw))
        os.replace(tmp, path.parent / data_name)
    finally:
        tmp.unlink(missing_ok=True)
    onnx.save_model(model, str(path))


def _raw(t: TensorProto) -> bytes:
    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()


def _nbytes(t: TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return int(np.prod(t.dims, dtype=np.int64)) * 4


def _point_to(t: TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
