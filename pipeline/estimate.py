"""What each step of a recipe will need, known before any heavy work: peak host memory from the model's
shape and the recipe, against this machine's memory.

The figures are a model of where memory goes, fitted to what the step loop records in every manifest
(pipeline/resources.py) on the scale ladder (benchmarks/checks/scale.py, which prints both):

    base            Python, torch, onnxruntime and the tokenizer, before any weights
    model           a local safetensors checkpoint: linked or converted tensor by tensor (the largest
                    tensor); any other source in memory (its dtype; a GGUF dequantized to float32)
    quantize rtn    tensor by tensor: a few copies of the largest tensor
    quantize        GPTQ/AWQ: the streamed model (embeddings and head, one layer at a time), the calibration
                    activations of one layer, the Hessians, the refit; the whole float32 model for W8A8
                    and for a sensitivity budget
    export          the streamed reference (embeddings and head in float32, one layer at a time) and the
                    runner's session of the graph (the graph itself is written from the checkpoint)
    validate        the float32 reference (whole up to pipeline.streamed.WHOLE_MODEL_LIMIT, else
                    streamed), the runner's session of the graph, a window's logits

A step whose estimate is beyond this machine's memory stops the run before anything is built, with
one line naming the knob that would help; one beyond the memory available now is a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.streamed import WHOLE_MODEL_LIMIT

GB = 1e9
BASE = 0.55 * GB
FLOAT32 = 4


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    stored_bytes: int  # the model step's checkpoint: its dtype's bytes per parameter (float32 for GGUF)
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    tied: bool = True  # the LM head is the embedding
    linked: bool = False  # the model step links or converts the checkpoint tensor by tensor
    q_width: int = 0  # attention heads x head size (0: the hidden size)
    kv_width: int = 0  # key/value heads x head size (0: the hidden size)

    @property
    def float32_bytes(self) -> int:
        return self.parameters * FLOAT32


@dataclass(frozen=True)
class StepEstimate:
    step: str
    peak_bytes: float
    knob: str  # what lowers it, for the refusal

    def describe(self) -> str:
        return f"{self.step} ~{self.peak_bytes / 2**30:.1f} GiB"


def model_shape(source_kind: str, location: str, dtype: str) -> ModelShape | None:
    """The shape of a local model source without loading its weights (None for a hub id: nothing to read here)."""
    if source_kind == "dir":
        config = json.loads((Path(location) / "config.json").read_text())
        text = config.get("text_config", config)
        hidden, layers = text.get("hidden_size"), text.get("num_hidden_layers")
        inter, vocab = text.get("intermediate_size") or 4 * (hidden or 0), text.get("vocab_size")
        if not (hidden and layers and vocab):
            return None
        reader = _reader(Path(location))
        if reader is not None:
            params, tied = reader.parameters(), "lm_head.weight" not in reader
        else:
            params = _parameters_from_config(text, hidden, inter, vocab, layers)
            tied = bool(text.get("tie_word_embeddings", False))
        own = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        stored = {"float32": 4, "bfloat16": 2, "float16": 2}.get(own if dtype == "auto" else dtype, 4)
        q_width, kv_width = _attention_widths(text, hidden)
        linked = reader is not None and _linked(Path(location))
        return ModelShape(params, params * stored, hidden, inter, vocab, layers, tied, linked, q_width, kv_width)
    if source_kind == "gguf":
        return _gguf_shape(Path(location))
    return None


def estimate(shape: ModelShape, stages: list[tuple[str, object]]) -> list[StepEstimate]:
    """Per step (the model step, then each stage of the recipe in order), the estimated peak RSS."""
    f32 = shape.float32_bytes
    largest = max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate) * FLOAT32
    logits = 512 * shape.vocab * FLOAT32 * 6  # a window's logits, log-probs and their float64 copies
    embeddings = shape.vocab * shape.hidden * FLOAT32 * (1 if shape.tied else 2)
    streamed = embeddings + 2 * (f32 - embeddings) / shape.layers  # the reference holding one layer at a time
    reference = f32 if f32 <= WHOLE_MODEL_LIMIT else streamed
    stored = 2 * largest * shape.stored_bytes / f32 if shape.linked else shape.stored_bytes
    out = [StepEstimate("model", BASE + stored, "model.dtype: bfloat16 (stores half of float32)")]
    graph_bytes = f32
    for name, cfg in stages:
        if name == "quantize":
            method, budget = cfg.method, getattr(cfg, "budget", None)
            bits = getattr(cfg, "bits", 4)
            if method == "rtn" and budget is None:
                out.append(StepEstimate("quantize", BASE + 5 * largest, "none: RTN streams tensor by tensor"))
            else:
                cal = cfg.calibration
                tokens = cal.num_samples * cal.sequence_length
                batch = cal.batch_size * cal.sequence_length
                # every token's hidden state entering and leaving the layer, and one batch's run through it
                activations = (
                    2 * tokens * shape.hidden * FLOAT32 + batch * (3 * shape.intermediate + 6 * shape.hidden) * FLOAT32
                )
                # the layer's input Hessians, and GPTQ's five working K×K matrices for the widest input (down_proj)
                hessians = (3 * shape.hidden**2 + 6 * shape.intermediate**2) * FLOAT32
                linear = shape.hidden * shape.intermediate * FLOAT32  # the refit's chunk of rows, GPTQ's weight copies
                # 1.2: the allocator's slack over a layer's many temporaries (fitted on the 0.5B rung of the scale ladder)
                work = 1.2 * (activations + hessians + 3 * linear + 256 * 2**20)
                head = shape.vocab * shape.hidden * FLOAT32 if getattr(cfg, "lm_head", "float") != "float" else 0
                # GPTQ/AWQ hold one decoder layer at a time, then the head (about three float32 copies of it)
                peak = BASE + streamed + max(work, 3 * head + activations)
                knob = "quantize.calibration.num_samples (activations)"
                if method == "w8a8" or budget is not None:  # SmoothQuant and the sensitivity pass: the whole model
                    peak = max(peak, BASE + 1.2 * f32 + work)
                    knob += "; quantize.budget loads the whole float32 model" if budget is not None else ""
                out.append(StepEstimate("quantize", peak, knob))
            graph_bytes = f32 * (bits / 32 + 1 / 16) if method != "w8a8" else f32 / 4
        elif name == "export":
            out.append(
                StepEstimate(
                    "export",
                    BASE + streamed + 1.25 * graph_bytes,
                    "a machine with more memory: export runs the graph in ONNX Runtime",
                )
            )
        elif name == "validate":
            # 1.6 GB: onnxruntime-genai's runtime (the genai target) on top of what the runner's session left
            out.append(
                StepEstimate(
                    "validate",
                    BASE + reference + 1.2 * graph_bytes + logits + 1.6 * GB,
                    "validate.max_windows, or a machine with more memory: validate runs the graph in ONNX Runtime",
                )
            )
        elif name == "distill":
            out.append(
                StepEstimate("distill", BASE + 4 * f32, "distill.num_layers or param_budget_m (a smaller student)")
            )
    return out


def memory_bytes() -> tuple[int, int]:
    """(total, available now) host memory in bytes, from /proc/meminfo (0, 0 where it cannot be read)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(info["MemTotal"].split()[0]) * 1024, int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def _linked(folder: Path) -> bool:
    from pipeline.models import streamable

    return streamable(folder)


def _reader(folder: Path):
    """The folder's safetensors headers (no tensor is read); None when it has no safetensors checkpoint."""
    from pipeline.checkpoint import CheckpointReader

    try:
        return CheckpointReader(folder)
    except FileNotFoundError:
        return None


def _attention_widths(text: dict, hidden: int) -> tuple[int, int]:
    """(query width, key/value width): heads x head size, from a config."""
    heads = text.get("num_attention_heads") or 1
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    return heads * head_dim, kv * head_dim


def _parameters_from_config(text: dict, hidden: int, inter: int, vocab: int, layers: int) -> int:
    q_width, kv_width = _attention_widths(text, hidden)
    attn = hidden * (q_width * 2 + kv_width * 2)
    embed = vocab * hidden * (1 if text.get("tie_word_embeddings") else 2)
    return layers * (attn + 3 * hidden * inter) + embed


def _gguf_shape(path: Path) -> ModelShape | None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    params = sum(int(t.n_elements) for t in reader.tensors)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(key: str) -> int | None:
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f is not None else None

    hidden, layers, inter = field("embedding_length"), field("block_count"), field("feed_forward_length")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(max(embed.shape)) if embed is not None else None
    if not (hidden and layers and vocab):
        return None
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    heads, kv = field("attention.head_count") or 1, field("attention.head_count_kv")
    head_dim = field("attention.key_length") or hidden // heads
    return ModelShape(
        params,
        params * FLOAT32,
        hidden,
        inter or 4 * hidden,
        vocab,
        layers,
        tied,
        False,
        heads * head_dim,
        (kv or heads) * head_dim,
    )
