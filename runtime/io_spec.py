"""The ONNX I/O contract, declared once and shared by the exporter and the runner.

Names follow the convention of optimum, Olive and onnxruntime-genai so their runtimes load our
graphs. One graph serves prefill (past length 0) and decode (sequence length 1):

    input_ids                    int64 [batch_size, sequence_length]
    attention_mask               int64 [batch_size, past_sequence_length + sequence_length]
    position_ids                 int64 [batch_size, sequence_length]
    past_key_values.{i}.key      float [batch_size, num_kv_heads, past_sequence_length, head_dim]
    past_key_values.{i}.value    float [batch_size, num_kv_heads, past_sequence_length, head_dim]
    -> logits                    float [batch_size, sequence_length, vocab_size]
    -> present.{i}.key|value     float [batch_size, num_kv_heads, past_sequence_length + sequence_length, head_dim]

The "fused" flavour (ONNX Runtime only: GroupQueryAttention) keeps the KV cache in one buffer of
`max_length` positions per layer, bound as both past and present and updated in place. Prompts are
right-padded; each sequence's own lengths replace the mask and position ids:

    input_ids                    int64 [batch_size, sequence_length]
    seqlens_k                    int32 [batch_size]   tokens in the cache after this step, minus one
    total_sequence_length        int32 []             prefill: the padded prompt width; decode: the buffer length
    logits_positions             int64 [batch_size, logits_length]   rows of the chunk whose logits are wanted
    past_key_values.{i}.key      dtype [batch_size, num_kv_heads, max_length, head_dim]
    -> logits                    float32 [batch_size, logits_length, vocab_size]
    -> present.{i}.key|value     dtype [batch_size, num_kv_heads, max_length, head_dim]  (the same buffer)

`dtype` (float32 or float16) is the weights' type and the cache's, unless `kv_cache` is "int8": then
the cache holds int8 codes, rounded by GroupQueryAttention with per-channel scales stored in the graph
(pipeline.quant.kv_int8). Logits are float32 either way. Such an artifact also holds the same graph with
a float cache (`prefill_model_file`, sharing the weights file) and the scales (`kv_scales_file`): the
runner runs prompts through the float graph and rounds their keys and values into the int8 cache.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

CONTRACT_FILE = "io_contract.json"
CONTRACT_VERSION = 2  # 2: the fused graph lost query_seqlens; logits always float32

BATCH, SEQ, PAST, TOTAL = (
    "batch_size",
    "sequence_length",
    "past_sequence_length",
    "past_sequence_length + sequence_length",
)
MAX_LENGTH, LOGITS = "max_length", "logits_length"
FLAVOURS = ("portable", "fused")
FILE_KEYS = ("model_file", "prefill_model_file", "kv_scales_file")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple  # ints or symbolic dim names


@dataclass(frozen=True)
class Contract:
    """What the runner needs to know about a graph, written beside it as io_contract.json."""

    flavour: str  # "portable": plain ONNX ops, loadable by optimum and others; "fused": ONNX Runtime contrib ops
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str = "float32"
    weights: str = "float"  # "float" or "MatMulNBits" (block-quantized linear layers)
    model_file: str = "model.onnx"
    max_positions: int = 0  # fused: rotary table length, the largest KV buffer the graph can take
    kv_cache: str = "float"  # fused: "float" (the cache in `dtype`) or "int8"
    # int8 cache: the same graph with a float cache, for prompts, and the scales [layers, 2 (key, value),
    # kv_heads, head_dim] the runner rounds its keys and values with (empty in artifacts from before)
    prefill_model_file: str = ""
    kv_scales_file: str = ""
    version: int = CONTRACT_VERSION

    def inputs(self) -> list[TensorSpec]:
        if self.flavour == "fused":
            kv = (BATCH, self.num_kv_heads, MAX_LENGTH, self.head_dim)
            return [
                TensorSpec("input_ids", "int64", (BATCH, SEQ)),
                TensorSpec("seqlens_k", "int32", (BATCH,)),
                TensorSpec("total_sequence_length", "int32", ()),
                TensorSpec("logits_positions", "int64", (BATCH, LOGITS)),
            ] + [TensorSpec(n, self.kv_dtype, kv) for n in self.past_names()]
        kv = (BATCH, self.num_kv_heads, PAST, self.head_dim)
        specs = [
            TensorSpec("input_ids", "int64", (BATCH, SEQ)),
            TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
            TensorSpec("position_ids", "int64", (BATCH, SEQ)),
        ]
        return specs + [TensorSpec(n, self.dtype, kv) for n in self.past_names()]

    def outputs(self) -> list[TensorSpec]:
        fused = self.flavour == "fused"
        kv = (BATCH, self.num_kv_heads, MAX_LENGTH if fused else TOTAL, self.head_dim)
        return [TensorSpec("logits", "float32", (BATCH, LOGITS if fused else SEQ, self.vocab_size))] + [
            TensorSpec(n, self.kv_dtype, kv) for n in self.present_names()
        ]

    @property
    def kv_dtype(self) -> str:
        """numpy dtype name of the cache buffers."""
        return "int8" if self.kv_cache == "int8" else self.dtype

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes, derived from the symbolic dims above."""
        return {
            s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)} for s in self.inputs() + self.outputs()
        }

    def kv_bytes_per_token(self, batch: int = 1) -> int:
        itemsize = {"float16": 2, "int8": 1}.get(self.kv_dtype, 4)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize * batch

    def save(self, folder: Path) -> None:
        (folder / CONTRACT_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Contract:
        path = Path(folder) / CONTRACT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {CONTRACT_FILE}; is this an export artifact?")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable ({type(e).__name__}); re-run the export stage") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object; re-run the export stage")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"{path}: unknown key {unknown[0]!r}; re-run the export stage with this version of the toolkit"
            )
        for key in FILE_KEYS:  # names of files beside the contract, never paths elsewhere
            name = data.get(key, "")
            if not isinstance(name, str) or (name and (Path(name).name != name or name in (".", ".."))):
                raise ValueError(f"{path}: {key} {name!r} must be a file name in the artifact folder")
        if data.get("version") != CONTRACT_VERSION:
            raise ValueError(
                f"{path}: contract version {data.get('version')} is not {CONTRACT_VERSION}; "
                f"re-run the export stage with this version of the toolkit"
            )
        if data.get("flavour") not in FLAVOURS:
            raise ValueError(f"{path}: flavour {data.get('flavour')!r} is not one of {', '.join(FLAVOURS)}")
        return cls(**data)
