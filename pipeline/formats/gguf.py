"""llama.cpp's GGUF from the quantize stage's codes: the same integers in ggml's block layouts.

    ours (MatMulNBits)                          ggml block of 32 weights
    int4 g32 symmetric   (q - 8) * scale    ->  Q4_0  {f16 d; u8 qs[16]}          d * (q - 8)
    int4 g32 asymmetric  (q - zp) * scale   ->  Q4_1  {f16 d; f16 m; u8 qs[16]}   d * q + m,  m = -zp * scale
                                                (zp an integer, or a float with zero_point: float)
    int8 g32 symmetric   (q - 128) * scale  ->  Q8_0  {f16 d; i8 qs[32]}          d * qs

The codes are copied; only the per-block scale (and Q4_1's minimum) is rounded to float16, which
ggml's blocks hold, and `write_gguf` reports the largest weight change that causes. Other layouts
(group sizes other than 32, 3-bit, ...) are refused with the reason; asymmetric int8 g32 has no
exact ggml block and is re-quantized to Q8_0 from our dequantized weights, a stated loss.
Norms and unquantized weights are written as float32. Where llama.cpp's graph for the family rotates
adjacent pairs (llama, Granite, SmolLM3), the rows of Q and K are interleaved per head, as its own
converter does; blocks run along a row, so permuting rows moves whole blocks and changes no code.
Each family is a line of `FAMILIES`: llama.cpp's architecture, that row order, Gemma's `1 + weight`
norms (llama.cpp multiplies by the weight, so 1 is added) and the config values llama.cpp reads.
What llama.cpp hard-codes or ignores for a family (SmolLM3's rotary-free layers, Gemma's attention scale,
Mistral's and Phi-3's sliding window) is checked against the config before any work (`gguf_family`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

from pipeline.archs import layer_kinds
from pipeline.errors import StageError
from pipeline.graph.quant_ops import EMBEDDING
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE
from pipeline.quant.primitives import unpack_matmul_nbits

GGUF_FOLDER, GGUF_FILE = "gguf", "model.gguf"  # where the export stage puts it
BLOCK = 32
Q = gguf.GGMLQuantizationType
EXACT = {(4, True): Q.Q4_0, (4, False): Q.Q4_1, (8, True): Q.Q8_0}
FORMATS_THAT_WORK = "int4 g32 symmetric (Q4_0), int4 g32 asymmetric (Q4_1), int8 g32 symmetric (Q8_0)"


@dataclass(frozen=True)
class GGUFFamily:
    arch: gguf.MODEL_ARCH
    interleave_qk: bool = False  # llama.cpp rotates adjacent pairs: HF's rotate-half rows of Q and K permuted
    norm_offset: float = 0.0  # added to every norm weight (Gemma's norms multiply by 1 + weight)
    metadata: tuple[tuple[str, str], ...] = ()  # (config attribute, GGUF key under the architecture) when set
    sliding_window: bool = False  # llama.cpp's graph applies the sliding window and its layer pattern from the file


A = gguf.MODEL_ARCH
SOFTCAPS = (
    ("attn_logit_softcapping", "attn_logit_softcapping"),
    ("final_logit_softcapping", "final_logit_softcapping"),
)
FAMILIES = {  # model_type -> how llama.cpp holds it
    "llama": GGUFFamily(A.LLAMA, interleave_qk=True),
    "mistral": GGUFFamily(A.LLAMA, interleave_qk=True),
    "qwen2": GGUFFamily(A.QWEN2),
    "qwen3": GGUFFamily(A.QWEN3),
    "granite": GGUFFamily(
        A.GRANITE,
        interleave_qk=True,
        metadata=(
            ("embedding_multiplier", "embedding_scale"),
            ("residual_multiplier", "residual_scale"),
            ("attention_multiplier", "attention.scale"),
            ("logits_scaling", "logit_scale"),
        ),
    ),
    "olmo2": GGUFFamily(A.OLMO2),
    "phi3": GGUFFamily(A.PHI3),
    "smollm3": GGUFFamily(A.SMOLLM3, interleave_qk=True),
    "gemma": GGUFFamily(A.GEMMA, norm_offset=1.0),
    "gemma2": GGUFFamily(A.GEMMA2, norm_offset=1.0, metadata=SOFTCAPS, sliding_window=True),
    "gemma3_text": GGUFFamily(A.GEMMA3, norm_offset=1.0, sliding_window=True),
}


@dataclass
class GGUFReport:
    tensors: dict[str, str] = field(default_factory=dict)  # gguf name -> ggml type
    converted: list[str] = field(default_factory=list)  # layers re-quantized (not exact)
    max_scale_rounding: float = 0.0  # largest |w_gguf - w_ours| from float16 block scales, over exact layers


def ggml_type(bits: int, group_size: int, symmetric: bool, layer: str) -> tuple[gguf.GGMLQuantizationType, bool]:
    """The ggml block type for one of our layer schemes, and whether the codes carry over exactly."""
    if group_size == BLOCK and (bits, symmetric) in EXACT:
        return EXACT[(bits, symmetric)], True
    if (bits, group_size, symmetric) == (8, BLOCK, False):
        return Q.Q8_0, False
    raise StageError(
        f"{layer}: int{bits} g{group_size} {'sym' if symmetric else 'asym'} has no GGUF block type; "
        f"GGUF takes {FORMATS_THAT_WORK}"
    )


def ggml_blocks(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, qtype) -> np.ndarray:
    """Codes [N, B, 32], scale and zero [N, B] -> ggml block bytes [N, B * block_bytes]."""
    n, b, _ = q.shape
    d = scale.astype(np.float16)[..., None].view(np.uint8)  # [N, B, 2]
    if qtype == Q.Q8_0:
        qs = (q.astype(np.int16) - zero[..., None]).astype(np.int8).view(np.uint8)
        parts = [d, qs]
    else:
        qs = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)  # element j low nibble, j + 16 high
        parts = (
            [d, qs]
            if qtype == Q.Q4_0
            else [d, (-zero.astype(np.float32) * scale).astype(np.float16)[..., None].view(np.uint8), qs]
        )
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def block_values(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, qtype) -> np.ndarray:
    """What ggml computes from our codes once the block scale is float16: [N, B * 32]."""
    d = scale.astype(np.float16).astype(np.float32)[..., None]
    if qtype == Q.Q4_1:
        m = (-zero.astype(np.float32) * scale).astype(np.float16).astype(np.float32)[..., None]
        return (d * q + m).reshape(q.shape[0], -1)
    return (d * (q.astype(np.float32) - zero[..., None])).reshape(q.shape[0], -1)


def permute_rows(a: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order of Q/K -> llama.cpp's interleaved pairs, per head (axis 0 = rows)."""
    return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def write_gguf(quant_dir: Path, out: Path, source_gguf: Path | None = None) -> GGUFReport:
    """GGUF of the checkpoint in `quant_dir`: a quantize artifact's codes (quantized.safetensors and
    quant_plan.json) as ggml blocks, everything else float32 (a float checkpoint is all float32).
    Tokenizer metadata is copied from `source_gguf` when the model came from one, else built from
    tokenizer.json. Written to a temporary name and renamed."""
    config = json.loads((quant_dir / "config.json").read_text())
    family = gguf_family(config, str(quant_dir))
    plan_file, packed_file = quant_dir / PLAN_FILE, quant_dir / PACKED_FILE
    plan_all = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    if plan_all.get("activations"):
        raise StageError(f"{quant_dir}: W8A8 weights cannot go to GGUF; GGUF takes {FORMATS_THAT_WORK}")
    plan = plan_all.get("layers", {})
    packed = load_file(str(packed_file)) if plan else {}
    dense = load_file(str(quant_dir / "model.safetensors"))
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(family.arch, layers)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    heads = heads if family.interleave_qk else {}

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[family.arch])
    _write_metadata(writer, config, family, quant_dir, source_gguf)
    report = GGUFReport()
    for hf_name, gguf_name in tensor_sources(list(dense), plan):
        layer, _, kind = hf_name.rpartition(".")
        gguf_name = gguf_name or names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise StageError(f"{quant_dir}: no GGUF name for tensor {hf_name} in llama.cpp's {writer.arch}")
        rows = heads.get(layer.rsplit(".", 1)[-1])
        if kind == "weight" and layer in plan:
            data, qtype = _quantized(packed, layer, plan[layer], rows, report)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)  # data: block bytes [N, B * block_bytes]
            report.tensors[gguf_name] = qtype.name
        else:
            w = dense[hf_name].astype(np.float32)
            if hf_name.endswith("norm.weight"):
                w = w + family.norm_offset
            writer.add_tensor(gguf_name, permute_rows(w, rows) if rows else w)
            report.tensors[gguf_name] = "F32"
    for gguf_name, w in _rope_tensors(config).items():
        writer.add_tensor(gguf_name, w)
        report.tensors[gguf_name] = "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return report


def tensor_sources(dense: list[str], plan: dict) -> list[tuple[str, str | None]]:
    """(HF tensor, GGUF name where the usual mapping does not apply) for every tensor to write. An
    embedding that shares the LM head's codes is written once, as the head's codes under token_embd,
    which llama.cpp also uses as the output; otherwise embedding and head are written separately."""
    shared = plan.get(EMBEDDING, {}).get("shared_with") == "lm_head"
    out: list[tuple[str, str | None]] = [(n, None) for n in dense if not (shared and n == f"{EMBEDDING}.weight")]
    if "lm_head" in plan and "lm_head.weight" not in dense:  # a tied checkpoint holds only the embedding
        out.append(("lm_head.weight", None))
    return [(n, "token_embd.weight" if shared and n == "lm_head.weight" else g) for n, g in out]


def _quantized(packed, layer, spec, rows, report: GGUFReport):
    qtype, exact = ggml_type(spec["bits"], spec["group_size"], spec["symmetric"], layer)
    if spec["K"] % BLOCK:
        raise StageError(f"{layer}: {spec['K']} inputs is not a multiple of GGUF's block of {BLOCK}")
    q, scale, zero = unpack_matmul_nbits(packed, layer, spec)
    if rows:
        q, scale, zero = permute_rows(q, rows), permute_rows(scale, rows), permute_rows(zero, rows)
    ours = ((q.astype(np.float32) - zero[..., None]) * scale[..., None]).reshape(q.shape[0], -1)
    if not exact:
        report.converted.append(layer)
        return gguf.quants.quantize(ours, qtype), qtype
    report.max_scale_rounding = max(
        report.max_scale_rounding, float(np.abs(block_values(q, scale, zero, qtype) - ours).max())
    )
    return ggml_blocks(q, scale, zero, qtype), qtype


def gguf_family(config: dict, where: str) -> GGUFFamily:
    """How llama.cpp holds this model, or the one line that says why it cannot (checked before any work)."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise StageError(
            f"{where}: GGUF export covers {', '.join(FAMILIES)}, not {model_type!r}; drop gguf from export.targets"
        )
    rope = rope_settings(config)
    scaling = rope["type"]
    window, layers = config.get("sliding_window"), config["num_hidden_layers"]
    problem = None
    if scaling not in ("default", "linear", "llama3"):
        problem = f"{scaling} rope scaling, which the GGUF writer does not carry"
    elif (
        not FAMILIES[model_type].sliding_window
        and "sliding_attention" in layer_kinds(SimpleNamespace(**config))
        and window < config["max_position_embeddings"]
    ):
        problem = f"a sliding window of {window}, which llama.cpp's {FAMILIES[model_type].arch.name.lower()} graph does not apply"
    elif model_type == "smollm3" and _rotary_layers(config) != [int((i + 1) % 4 != 0) for i in range(layers)]:
        problem = "rotary-free layers other than every fourth, the only pattern llama.cpp's smollm3 graph has"
    elif model_type in ("gemma2", "gemma3_text") and config.get("query_pre_attn_scalar") != _gemma_scalar(config):
        problem = (
            f"query_pre_attn_scalar {config.get('query_pre_attn_scalar')}: llama.cpp scales the scores by head_dim "
            f"({_head_dim(config)}; hidden_size / heads for the 27B models) and reads no scale from the file"
        )
    elif model_type == "gemma3_text" and rope["local_theta"] not in (None, 10000.0):
        problem = f"a rotary base of {rope['local_theta']} on its sliding layers: llama.cpp's gemma3 graph uses 10,000"
    if problem:
        raise StageError(f"{where}: {model_type} with {problem}; drop gguf from export.targets")
    return FAMILIES[model_type]


def _rotary_layers(config: dict) -> list[int]:
    """SmolLM3's per-layer rotary flags (1: rotary), as the config lists them or as its interval makes them."""
    interval = config.get("no_rope_layer_interval", 4)
    return config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(config["num_hidden_layers"])]


def _gemma_scalar(config: dict) -> int:
    """What llama.cpp's Gemma 2/3 graphs scale the scores by (as 1/sqrt): head_dim, except in the 27B models it
    recognizes by their depth (46 layers for Gemma 2, 62 for Gemma 3), where it is hidden_size / heads."""
    if config["num_hidden_layers"] == {"gemma2": 46, "gemma3_text": 62}[config["model_type"]]:
        return config["hidden_size"] // config["num_attention_heads"]
    return _head_dim(config)


def rope_settings(config: dict) -> dict[str, Any]:
    """The rotary base (of the full-attention layers, and of the sliding ones where they have their own), its
    scaling and that scaling's type, and the rotated fraction of a head, from transformers 5's `rope_parameters` or 4.x's top-level keys."""
    rope = config.get("rope_parameters") or {}
    local = None
    if isinstance(rope.get("full_attention"), dict):  # Gemma 3: a table per layer kind
        local = rope.get("sliding_attention", {}).get("rope_theta")
        rope = rope["full_attention"]
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")} or (
        config.get("rope_scaling") or {}
    )
    return {
        "theta": float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
        "local_theta": local or config.get("rope_local_base_freq"),
        "scaling": scaling,
        "type": scaling.get("rope_type", scaling.get("type", "default")),
        "partial": float(rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0),
    }


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_tensors(config: dict) -> dict[str, np.ndarray]:
    """llama3 rope scaling as llama.cpp takes it: a divisor per rotary frequency (`rope_freqs.weight`),
    computed as transformers does (long wavelengths slowed by `factor`, a smooth blend between)."""
    rope = rope_settings(config)
    s = rope["scaling"]
    if rope["type"] != "llama3":
        return {}
    dim = int(_head_dim(config) * rope["partial"])
    freqs = 1.0 / rope["theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    divisor = np.where(
        wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": divisor.astype(np.float32)}


def _write_metadata(
    writer: gguf.GGUFWriter, config: dict, family: GGUFFamily, folder: Path, source_gguf: Path | None
) -> None:
    head_dim = _head_dim(config)
    rope = rope_settings(config)
    writer.add_name(folder.parent.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope["theta"])
    writer.add_rope_dimension_count(int(head_dim * rope["partial"]))
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["scaling"]["factor"]))
    if rope["local_theta"]:
        writer.add_rope_freq_base_swa(float(rope["local_theta"]))
    kinds = layer_kinds(SimpleNamespace(**config))
    if "sliding_attention" in kinds:
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])
    for attribute, key in family.metadata:
        if config.get(attribute) is not None:
            writer.add_float32(f"{writer.arch}.{key}", float(config[attribute]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if source_gguf is not None:
        _copy_tokenizer(writer, source_gguf)
    else:
        _tokenizer_from_json(writer, folder)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """The source GGUF's tokenizer.* keys verbatim: llama.cpp tokenizes exactly as with the original."""
    reader = gguf.GGUFReader(str(source))
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)


def _tokenizer_from_json(writer: gguf.GGUFWriter, folder: Path) -> None:
    """A byte-level BPE tokenizer.json as GGUF's gpt2 tokenizer; special tokens marked as control."""
    vocab = gguf.vocab.BpeVocab(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i, (text, _score, kind) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        types.append(gguf.TokenType.CONTROL if i in special else kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    template = folder / "chat_template.jinja"
    if special_vocab.chat_template is None and template.is_file():
        special_vocab.chat_template = template.read_text()
    special_vocab.add_to_gguf(writer, quiet=True)
