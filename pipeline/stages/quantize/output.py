"""The quantize step's artifact, written a tensor at a time: the float checkpoint (dequantized weights),
`quantized.safetensors` (the packed codes) and `quant_plan.json`.

Shared by the two streaming paths, rtn.py (tensor by tensor) and layerwise.py (decoder layer by layer),
so both write the same files the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint import SafetensorsWriter
from pipeline.models import copy_tokenizer, save_pretrained
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE
from pipeline.quant.primitives import QTensor, QuantScheme, pack_matmul_nbits
from pipeline.stages.quantize.plan import EMBEDDING, embedding_scheme, embedding_shares_head, plan_file

HEAD = "lm_head"


def skeleton(folder: Path):
    """The model of `folder` on the meta device: module names, types and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class HeadLayout:
    """How the output checkpoint holds the embedding and the head."""

    share: bool  # a tied embedding holds the head's codes (one copy)
    embed_scheme: QuantScheme | None  # the embedding's own scheme (None: float)
    tied: bool  # head and embedding stay one tensor in the output

    @property
    def plan_entry(self) -> dict | None:
        """The embedding's entry in quant_plan.json (None: float)."""
        return None if self.embed_scheme is None else {"shared_with": HEAD if self.share else None}


def head_layout(model, cfg, plan: dict[str, QuantScheme], skipped: dict[str, str]) -> HeadLayout:
    """The layout for `plan`; adds the embedding to `skipped` when it stays float. A head quantized on its own
    unties from a tied embedding."""
    share = embedding_shares_head(model, cfg)
    embed_scheme = embedding_scheme(model, cfg)
    if embed_scheme is None:
        skipped[EMBEDDING] = "embedding: float (recipe)"
    untie = HEAD in plan and model.config.tie_word_embeddings and not share
    return HeadLayout(share, embed_scheme, model.config.tie_word_embeddings and not untie)


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


def finish(
    out: Path,
    src: Path,
    config,
    method: str,
    plan: dict[str, QuantScheme],
    skipped: dict[str, str],
    codes: PackedCodes,
    layout: HeadLayout,
) -> None:
    """The plan (quantized layers in plan order, then the embedding), the config and the tokenizer."""
    order = [n for n in (*plan, EMBEDDING) if n in codes.shapes]
    (out / PLAN_FILE).write_text(plan_file(method, {n: codes.shapes[n] for n in order}, layout.plan_entry, skipped))
    config.tie_word_embeddings = layout.tied
    config.dtype = torch.float32
    save_pretrained(config, out)
    copy_tokenizer(src, out)
