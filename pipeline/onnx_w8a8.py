"""W8A8 on the traced float graph with ONNX Runtime's quantization tools (CPU provider).

    dynamic: MatMul -> DynamicQuantizeLinear + MatMulInteger (activation ranges found per run)
    static:  MatMul -> QDQ pairs with activation ranges calibrated (MinMax) on the recipe's
             calibration blocks, which the quantize stage saved as calibration_ids.npy

Weights are int8 per output channel in both. Only the decoder's linear layers the quantize stage
lists are quantized (its ignore list keeps others float): the attention's own matmuls (activation × activation: scores and weighted values) and the LM head stay
float, as in SmoothQuant and llm-compressor; quantizing the scores per tensor ruins the model.
Run after the export's float parity check.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from pipeline.errors import StageError
from pipeline.onnx_quant import module_of
from runtime.io_spec import Contract


class _Blocks(CalibrationDataReader):
    """ORT CalibrationDataReader over token blocks: one prefill (empty past) per block."""

    def __init__(self, ids: np.ndarray, contract: Contract):
        self.ids, self.contract, self.i = ids, contract, 0

    def get_next(self):
        if self.i == len(self.ids):
            return None
        ids = self.ids[self.i: self.i + 1]
        self.i += 1
        empty = np.zeros((1, self.contract.num_kv_heads, 0, self.contract.head_dim), dtype=np.float32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
                **{name: empty for name in self.contract.past_names()}}


def linear_nodes(path: Path, modules: list[str]) -> list[str]:
    """Names of the MatMul nodes of these linear layers (weight from an initializer)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    nodes = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights and module_of(n.name) in modules]
    if len(nodes) != len(modules):
        raise StageError(f"export: found {len(nodes)} of the {len(modules)} W8A8 linears in the graph")
    return nodes


def quantize_w8a8(path: Path, mode: str, contract: Contract, calibration: Path | None, modules: list[str]) -> onnx.ModelProto:
    """The quantized graph of the float model at `path` (returned in memory, weights loaded)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / "model.onnx"
        common = dict(op_types_to_quantize=["MatMul"], nodes_to_quantize=linear_nodes(path, set(modules)), per_channel=True,
                      use_external_data_format=True)
        if mode == "dynamic":
            quantize_dynamic(path, out, weight_type=QuantType.QInt8, **common)
        else:
            reader = _Blocks(np.load(calibration), contract)
            quantize_static(path, out, reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True}, **common)
        graph = onnx.load(str(out))
    return graph
