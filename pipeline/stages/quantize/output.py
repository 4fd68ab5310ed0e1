"""The quantize step's artifact, written a tensor at a time: the float checkpoint (dequantized weights),
`quantized.safetensors` (the packed codes) and `quant_plan.json`.

Shared by the two streaming paths, rtn.py (tensor by tensor) and layerwise.py (decoder layer by layer),
so both write the same files the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.checkpoint import SafetensorsWriter
from pipeline.models import copy_tokenizer
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE
from pipeline.quant.primitives import QTensor, QuantScheme, pack_matmul_nbits
from pipeline.stages.quantize.plan import EMBEDDING, plan_file

HEAD = "lm_head"


def skeleton(folder: Path):
    """The model of `folder` on the meta device: module names, types and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class PackedCodes:
    """quantized.safetensors, written as each layer's codes arrive; remembers each layer's scheme and [N, K]."""

    def __init__(self, out: Path):
        self.writer = SafetensorsWriter(out / PACKED_FILE)
        self.shapes: dict[str, tuple[QuantScheme, int, int]] = {}
        self.bytes = 0

    def add(self, name: str, qt: QTensor) -> None:
        self.shapes[name] = (qt.scheme, qt.shape[0], qt.shape[1])
        for part, array in pack_matmul_nbits(qt).items():
            self.writer.add(f"{name}.{part}", array)
            self.bytes += array.nbytes

    def __enter__(self) -> PackedCodes:
        self.writer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.writer.__exit__(*exc)


def finish(out: Path, src: Path, config, method: str, plan: dict[str, QuantScheme], skipped: dict[str, str],
           codes: PackedCodes, embed: dict | None, tied: bool) -> None:
    """The plan (quantized layers in plan order, then the embedding), the config and the tokenizer."""
    order = [n for n in (*plan, EMBEDDING) if n in codes.shapes]
    (out / PLAN_FILE).write_text(plan_file(method, {n: codes.shapes[n] for n in order}, embed, skipped))
    config.tie_word_embeddings = tied
    config.dtype = torch.float32
    config.save_pretrained(out)
    copy_tokenizer(src, out)
