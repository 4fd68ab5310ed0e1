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

    W8A8 (the graph's codes)           compressed-tensors "int-quantized"
    int8 W [K, N], scale [N], zp 0     weight int8 [N, K], weight_scale [N, 1]
    static input: scale, uint8 zp 128  input_scale [1] (symmetric: zero point 0, not written)

Nothing is re-quantized: the codes and scales are copied (scales cast to the checkpoint's dtype,
float32 for our reference model, so bit-exact there). W8A8 codes are made at export (our rewrites,
or ONNX Runtime's quantizer for `dynamic`), so they are read back from the quantized graph. compressed-tensors quantizes
linear layers only, so a quantized embedding is written as its dequantized float weights, and a tied
LM head that is quantized is untied (the float embedding beside the head's codes). Groups must divide
every layer's input width: other layouts are refused with the reason.
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
from pipeline.graph.quant_ops import EMBEDDING
from pipeline.graph.w8a8 import W8A8Codes, read_w8a8_codes
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE
from pipeline.quant.primitives import unpack_matmul_nbits

HF_QUANTIZED_FOLDER = "hf-quantized"
FORMATS_THAT_WORK = (
    "weight-only int4 or int8 (W4A16 / W8A16), symmetric or asymmetric, with a group size "
    "that divides every layer's input width; or W8A8 (dynamic or static)"
)
# vLLM fuses these siblings into one matmul and needs one scheme across each set
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class Group:
    """One compressed-tensors config group: the quantization args and the layers that use them."""

    weights: dict
    inputs: dict | None = None
    layers: list[str] = field(default_factory=list)


@dataclass
class CompressedReport:
    format: str = ""  # pack-quantized (weight-only) or int-quantized (W8A8)
    groups: dict[str, Group] = field(default_factory=dict)  # scheme label -> its group
    float_linears: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is not a plain copy, and why
    vllm_problems: list[str] = field(default_factory=list)  # what vLLM would refuse to load
    dtype: str = ""  # of the float tensors and scales


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The torch dtype a config.json names (`dtype` in newer transformers, `torch_dtype` before), float32 if none."""
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")


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


def packed_tensors(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: dict, dtype: torch.dtype) -> dict:
    """One weight-only layer's codes [N, groups, G], scale and zero point [N, groups] as pack-quantized tensors."""
    n, k, bits = spec["N"], spec["K"], spec["bits"]
    out = {
        "weight_packed": torch.from_numpy(pack_int32(q.reshape(n, -1)[:, :k], bits)),
        "weight_scale": torch.from_numpy(scale.astype(np.float32)).to(dtype),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not spec["symmetric"]:
        out["weight_zero_point"] = torch.from_numpy(np.ascontiguousarray(pack_int32(zero.T, bits).T))
    return out


def w8a8_tensors(codes: W8A8Codes, dtype: torch.dtype) -> dict:
    """One W8A8 linear as int-quantized tensors: int8 weight, per-channel scale, and (static) the input's range,
    its uint8 zero point moved to int8 (q - 128 on both sides of (q - zp) * s: the same numbers)."""
    out = {"weight": torch.from_numpy(codes.weight), "weight_scale": torch.from_numpy(codes.scale[:, None]).to(dtype)}
    if codes.input_scale is not None:
        out["input_scale"] = torch.tensor([codes.input_scale], dtype=dtype)
        if codes.input_zero_point != 128:  # older artifacts' asymmetric ranges (ONNX Runtime's QDQ)
            out["input_zero_point"] = torch.tensor([codes.input_zero_point - 128], dtype=torch.int8)
    return out


def scheme_label(spec: dict) -> str:
    return f"int{spec['bits']} g{spec['group_size']} {'sym' if spec['symmetric'] else 'asym'}"


def weight_args(bits: int, symmetric: bool, strategy: str, group_size: int | None = None) -> dict:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": strategy,
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }


# ONNX Runtime's dynamic mode rounds W8A8 activations per tensor, asymmetric uint8 (each run's own
# range). vLLM's int8 kernels take dynamic activations per token only, so a dynamic artifact is
# written per token, symmetric (llm-compressor's W8A8). Static is ours: symmetric, one calibrated
# scale per tensor, written as it is.
PER_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True, "observer": None}
W8A8_INPUTS = {
    "dynamic": PER_TOKEN,
    "dynamic_per_token": PER_TOKEN,  # what the ONNX graph computes
    "static": {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "tensor",
        "dynamic": False,
        "observer": "mse",
    },
}


def write_compressed_tensors(
    quant_dir: Path, out: Path, w8a8_graph: Path | None = None, dtype_name: str = "auto"
) -> CompressedReport:
    """The checkpoint in `quant_dir` (a quantize artifact) as a compressed-tensors checkpoint in `out`,
    built in a temporary folder and renamed. Weight-only codes come from quantized.safetensors and
    quant_plan.json; W8A8 codes from the ONNX graph `w8a8_graph` that ONNX Runtime quantized.
    `dtype_name` other than auto casts the float tensors and scales (bfloat16 halves a float embedding;
    vLLM computes in 16 bits anyway); integer codes and zero points are never touched."""
    config = json.loads((quant_dir / "config.json").read_text())
    plan_file = quant_dir / PLAN_FILE
    plan_all = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    dtype = checkpoint_dtype(config)
    report = CompressedReport()
    if dtype_name != "auto" and getattr(torch, dtype_name) != dtype:
        report.notes.append(
            f"float tensors and scales rounded from {str(dtype).removeprefix('torch.')} to {dtype_name}; "
            "the integer codes and zero points are unchanged"
        )
        dtype = getattr(torch, dtype_name)
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
    report.dtype = str(dtype).removeprefix("torch.")
    if plan_all.get("activations"):
        if w8a8_graph is None:
            raise StageError(f"{quant_dir}: W8A8 codes are made by ONNX Runtime at export; pass the quantized graph")
        layers, fmt = _w8a8_layers(plan_all, w8a8_graph, dtype, report), "int-quantized"
    else:
        layers, fmt = _weight_only_layers(plan_all, quant_dir, dtype, report), "pack-quantized"

    tensors: dict[str, torch.Tensor] = {}
    for name, array in load_file(str(quant_dir / "model.safetensors")).items():
        layer = name.removesuffix(".weight")
        if layer in layers:
            continue
        tensors[name] = torch.from_numpy(array).to(dtype)
        if layer.endswith("_proj"):
            report.float_linears.append(layer)
    if "lm_head" not in layers:
        report.float_linears.append("lm_head")  # tied or not, a Linear module that targets must not catch
    for layer, parts in layers.items():
        tensors.update({f"{layer}.{key}": t for key, t in parts.items()})
    if EMBEDDING in plan_all.get("layers", {}):
        report.notes.append(
            f"{EMBEDDING}: written as its dequantized float weights (compressed-tensors quantizes "
            "linear layers only); the values are those of our codes"
        )
    if "lm_head" in layers and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
        report.notes.append("lm_head: untied from the embedding, which stays float beside the head's codes")
    report.format = fmt
    config["quantization_config"] = _quantization_config(report, fmt)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        if (quant_dir / extra).is_file():
            shutil.copy2(quant_dir / extra, tmp / extra)
    tmp.replace(out)
    return report


def _weight_only_layers(plan_all: dict, quant_dir: Path, dtype, report: CompressedReport) -> dict[str, dict]:
    plan = {n: s for n, s in plan_all.get("layers", {}).items() if n != EMBEDDING}
    if not plan:
        raise StageError(
            f"{quant_dir}: no quantized layers; hf-quantized writes a quantize stage's codes "
            "(a float model needs no compressed-tensors checkpoint)"
        )
    for layer, spec in plan.items():
        if spec.get("float_zero"):
            raise StageError(
                f"{layer}: float zero points have no compressed-tensors form (its zero points are integers); "
                f"hf-quantized takes {FORMATS_THAT_WORK} with zero_point: int"
            )
        if spec["K"] % spec["group_size"]:
            raise StageError(
                f"{layer}: {spec['K']} inputs is not a multiple of group_size {spec['group_size']}; "
                f"compressed-tensors needs whole groups: hf-quantized takes {FORMATS_THAT_WORK}"
            )
    packed = load_file(str(quant_dir / PACKED_FILE))
    layers = {}
    for layer, spec in plan.items():
        layers[layer] = packed_tensors(*unpack_matmul_nbits(packed, layer, spec), spec, dtype)
        group = report.groups.setdefault(
            scheme_label(spec), Group(weight_args(spec["bits"], spec["symmetric"], "group", spec["group_size"]))
        )
        group.layers.append(layer)
    report.vllm_problems = _vllm_problems({n: scheme_label(s) for n, s in plan.items()})
    return layers


def _w8a8_layers(plan_all: dict, graph: Path, dtype, report: CompressedReport) -> dict[str, dict]:
    mode = plan_all["activations"]
    codes = read_w8a8_codes(graph, plan_all["w8a8_modules"])
    label = f"int8 W8A8 {mode} (weights per channel, activations {W8A8_INPUTS[mode]['strategy']})"
    report.groups[label] = Group(weight_args(8, True, "channel"), W8A8_INPUTS[mode], list(codes))
    report.notes.append(
        {
            "dynamic": "W8A8 dynamic: ONNX Runtime rounds activations per tensor (asymmetric uint8); this checkpoint asks "
            "for per token (symmetric int8), the dynamic scheme vLLM runs: the weights are the same codes, the "
            "activation rounding differs (activations: dynamic_per_token matches exactly)",
            "dynamic_per_token": "W8A8 dynamic per token: the same weight codes and activation scheme as the ONNX graph; the "
            "per-token scale is absmax / 127 in the graph and in vLLM, absmax / 127.5 in "
            "compressed-tensors' own reference code (what transformers runs)",
            "static": "W8A8 static: the same weight codes and calibrated input scales as the ONNX graph (symmetric, one "
            "per tensor); the graph's QuantizeLinear codes span [-128, 127], compressed-tensors' [-128, 127] too",
        }[mode]
    )
    report.vllm_problems = _vllm_problems({n: label if n in codes else "float" for n in plan_all["w8a8_modules"]})
    return {m: w8a8_tensors(c, dtype) for m, c in codes.items()}


def _quantization_config(report: CompressedReport, fmt: str) -> dict:
    """config.json's quantization_config: one config group per scheme. A single scheme over every
    quantized linear targets the class `Linear`, as llm-compressor writes it (float linears go to
    `ignore`); otherwise each group names its layers."""
    uniform = len(report.groups) == 1
    groups = {
        f"group_{i}": {
            "targets": ["Linear"] if uniform else g.layers,
            "weights": g.weights,
            "input_activations": g.inputs,
            "output_activations": None,
            "format": fmt,
        }
        for i, g in enumerate(report.groups.values())
    }
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": report.float_linears,
        "kv_cache_scheme": None,
    }


def _vllm_problems(labels: dict[str, str]) -> list[str]:
    """Sibling layers vLLM fuses into one matmul but that hold different schemes here (`labels`: layer -> scheme)."""
    problems = []
    for layer in labels:
        parent, _, kind = layer.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if kind != siblings[0]:
                continue
            found = {s: labels.get(f"{parent}.{s}", "float") for s in siblings}
            if len(set(found.values())) > 1:
                problems.append(f"{parent}: " + ", ".join(f"{s} {v}" for s, v in found.items()))
    return problems
