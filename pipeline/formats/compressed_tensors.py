"""A Hugging Face checkpoint in the compressed-tensors format (what llm-compressor writes and vLLM
reads) from the quantize stage's codes: the same integers, packed into int32 words.

    ours (MatMulNBits)                 compressed-tensors "pack-quantized" (W4A16 / W8A16)
    codes q in [0, 2^b - 1]            weight_packed int32 [N, K * b / 32]: element j at bits b*j of its word,
                                       stored as (q - 2^(b-1)) + 2^(b-1), i.e. our unsigned code itself
    scale [N, groups]                  weight_scale [N, groups], in the checkpoint's dtype
    zero point zp in [0, 2^b - 1]      weight_zero_point int32 [N * b / 32, groups], packed along the rows
                                       (asymmetric layers only; symmetric ones have zp = 2^(b-1), i.e. 0 signed)
    value (q - zp) * scale             (q_signed - zp_signed) * scale: the same number
                                       weight_shape int64 [2] = [N, K]

Nothing is re-quantized: the codes and scales are copied (scales cast to the checkpoint's dtype,
float32 for our reference model, so bit-exact there). compressed-tensors quantizes linear layers
only, so a quantized embedding is written as its dequantized float weights, and a tied LM head that
is quantized is untied (the float embedding beside the head's codes). Its groups must divide every
layer's input width, and W8A8 (quantized by ONNX Runtime inside the graph at export) has no codes
here to copy: both are refused with the reason.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from pipeline.errors import StageError
from pipeline.onnx_quant import EMBEDDING
from pipeline.quant.primitives import unpack_matmul_nbits

HF_QUANTIZED_FOLDER = "hf-quantized"
FORMATS_THAT_WORK = ("weight-only int4 or int8 (W4A16 / W8A16), symmetric or asymmetric, with a group size "
                     "that divides every layer's input width")
# vLLM fuses these siblings into one matmul and needs one scheme across each set
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class CompressedReport:
    groups: dict[str, list[str]] = field(default_factory=dict)  # scheme label -> layers
    float_linears: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is not a plain copy, and why
    vllm_problems: list[str] = field(default_factory=list)  # what vLLM would refuse to load


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [R, C] -> int32 words [R, ceil(C * bits / 32)], element j at bits (j % per) * bits."""
    per = 32 // bits
    rows, cols = values.shape
    padded = np.zeros((rows, -(-cols // per) * per), dtype=np.uint32)
    padded[:, :cols] = values
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    words = (padded.reshape(rows, -1, per) << shifts).sum(axis=-1, dtype=np.uint32)
    return words.view(np.int32)


def unpack_int32(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """The inverse of `pack_int32`: int32 words [R, W] -> unsigned codes [R, cols]."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    values = (words.view(np.uint32)[..., None] >> shifts) & np.uint32(2**bits - 1)
    return values.reshape(words.shape[0], -1)[:, :cols].astype(np.uint8)


def compressed_tensors(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: dict, dtype: torch.dtype) -> dict:
    """One layer's codes [N, groups, G], scale and zero point [N, groups] as compressed-tensors' tensors."""
    n, k, bits = spec["N"], spec["K"], spec["bits"]
    out = {
        "weight_packed": torch.from_numpy(pack_int32(q.reshape(n, -1)[:, :k], bits)),
        "weight_scale": torch.from_numpy(scale.astype(np.float32)).to(dtype),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not spec["symmetric"]:
        out["weight_zero_point"] = torch.from_numpy(np.ascontiguousarray(pack_int32(zero.T, bits).T))
    return out


def scheme_label(spec: dict) -> str:
    return f"int{spec['bits']} g{spec['group_size']} {'sym' if spec['symmetric'] else 'asym'}"


def write_compressed_tensors(quant_dir: Path, out: Path) -> CompressedReport:
    """The checkpoint in `quant_dir` (a quantize artifact: dequantized model.safetensors, codes in
    quantized.safetensors, the plan in quant_plan.json) as a compressed-tensors checkpoint in `out`,
    built in a temporary folder and renamed."""
    config = json.loads((quant_dir / "config.json").read_text())
    plan_file = quant_dir / "quant_plan.json"
    plan_all = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    if plan_all.get("activations"):
        raise StageError(f"{quant_dir}: W8A8 is quantized by ONNX Runtime inside the graph, so there are no codes to "
                         f"copy into compressed-tensors; hf-quantized takes {FORMATS_THAT_WORK}")
    plan = {n: s for n, s in plan_all.get("layers", {}).items() if n != EMBEDDING}
    if not plan:
        raise StageError(f"{quant_dir}: no quantized layers; hf-quantized writes a quantize stage's codes "
                         "(a float model needs no compressed-tensors checkpoint)")
    for layer, spec in plan.items():
        if spec["K"] % spec["group_size"]:
            raise StageError(f"{layer}: {spec['K']} inputs is not a multiple of group_size {spec['group_size']}; "
                             f"compressed-tensors needs whole groups: hf-quantized takes {FORMATS_THAT_WORK}")
    dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype") or "float32")
    dense = load_file(str(quant_dir / "model.safetensors"))
    packed = load_file(str(quant_dir / "quantized.safetensors"))
    report = CompressedReport()

    tensors: dict[str, torch.Tensor] = {}
    for name, array in dense.items():
        layer = name.removesuffix(".weight")
        if layer in plan:
            continue
        tensors[name] = torch.from_numpy(array).to(dtype)
        if layer.endswith("_proj"):
            report.float_linears.append(layer)
    if "lm_head" not in plan:
        report.float_linears.append("lm_head")  # tied or not, a Linear module that targets must not catch
    for layer, spec in plan.items():
        q, scale, zero = unpack_matmul_nbits(packed, layer, spec)
        for key, t in compressed_tensors(q, scale, zero, spec, dtype).items():
            tensors[f"{layer}.{key}"] = t
        report.groups.setdefault(scheme_label(spec), []).append(layer)
    if EMBEDDING in plan_all.get("layers", {}):
        report.notes.append(f"{EMBEDDING}: written as its dequantized float weights (compressed-tensors quantizes "
                            "linear layers only); the values are those of our codes")
    if "lm_head" in plan and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
        report.notes.append("lm_head: untied from the embedding, which stays float beside the head's codes")
    report.vllm_problems = _vllm_problems(plan)
    config["quantization_config"] = _quantization_config(plan, report)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja"):
        if (quant_dir / extra).is_file():
            shutil.copy2(quant_dir / extra, tmp / extra)
    tmp.replace(out)
    return report


def _quantization_config(plan: dict, report: CompressedReport) -> dict:
    """config.json's quantization_config: one config group per scheme. A single scheme over every
    quantized linear targets the class `Linear`, as llm-compressor writes it; otherwise each group
    names its layers."""
    uniform = len(report.groups) == 1
    specs = {scheme_label(s): s for s in plan.values()}
    groups = {}
    for i, (label, layers) in enumerate(report.groups.items()):
        spec = specs[label]
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if uniform else layers,
            "weights": {"num_bits": spec["bits"], "type": "int", "symmetric": spec["symmetric"], "strategy": "group",
                        "group_size": spec["group_size"], "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": report.float_linears, "kv_cache_scheme": None}


def _vllm_problems(plan: dict) -> list[str]:
    """Sibling layers vLLM fuses into one matmul but that hold different schemes here."""
    problems = []
    for layer in plan:
        parent, _, kind = layer.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if kind != siblings[0]:
                continue
            labels = {s: scheme_label(plan[f"{parent}.{s}"]) if f"{parent}.{s}" in plan else "float" for s in siblings}
            if len(set(labels.values())) > 1:
                problems.append(f"{parent}: " + ", ".join(f"{s} {v}" for s, v in labels.items()))
    return problems
