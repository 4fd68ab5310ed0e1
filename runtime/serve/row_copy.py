"""Copying one KV-cache row onto another where the cache lives, for a cache numpy cannot reach.

On the CPU the slots copy a row's filled positions with numpy. A cache in GPU memory has no numpy
view, and onnxruntime's Python API has no device-to-device copy of raw memory, so the copy is a
graph: one Identity per cache buffer, its input bound at the source row's address and its output
at the destination row's, run on the cache's provider (a device-to-device memcpy per buffer, one
`run` for every layer's key and value). Whole rows are copied, `max_length` positions each: the
positions past the filled ones are unread until the new owner writes them.

The class runs the same way on the CPU, which is how the tests check the device path here.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from runtime.session import PROVIDERS

_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int8): TensorProto.INT8,
}


def row_address(value: ort.OrtValue, row: int, dtype: np.dtype) -> int:
    """Address of row `row` of a C-ordered [rows, ...] buffer of `dtype`."""
    return value.data_ptr() + row * int(np.prod(value.shape()[1:])) * dtype.itemsize


class RowCopy:
    """`copy(src, dst)` copies row `src` of every buffer (all of `dtype`) onto row `dst`, on `device`
    ("cpu" or "cuda")."""

    def __init__(self, buffers: list[ort.OrtValue], dtype: np.dtype, device: str):
        self.buffers, self.device = buffers, device
        self.dtype, self.row_shape = dtype, [1, *buffers[0].shape()[1:]]
        nodes = [helper.make_node("Identity", [f"src{i}"], [f"dst{i}"], name=f"copy{i}") for i in range(len(buffers))]
        info = [
            helper.make_tensor_value_info(f"{kind}{i}", _ONNX_TYPES[dtype], self.row_shape)
            for kind in ("src", "dst")
            for i in range(len(buffers))
        ]
        graph = helper.make_graph(nodes, "row_copy", info[: len(buffers)], info[len(buffers) :])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every Identity a copy
        self.session = ort.InferenceSession(
            model.SerializeToString(), sess_options=opts, providers=[PROVIDERS["cuda" if device == "cuda" else "cpu"]]
        )
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}

    def __call__(self, src: int, dst: int) -> None:
        binding = self._bindings.get((src, dst))
        if binding is None:
            binding = self.session.io_binding()
            for i, buffer in enumerate(self.buffers):
                binding.bind_input(
                    f"src{i}", self.device, 0, self.dtype, self.row_shape, row_address(buffer, src, self.dtype)
                )
                binding.bind_output(
                    f"dst{i}", self.device, 0, self.dtype, self.row_shape, row_address(buffer, dst, self.dtype)
                )
            self._bindings[(src, dst)] = binding
        self.session.run_with_iobinding(binding)
