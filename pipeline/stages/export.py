"""Export stage: hf-model -> ONNX graph with KV-cache inputs/outputs (prefill and decode in one).

The HF model is wrapped so that the graph takes flat `past_key_values.{i}.key|value` tensors
and the 2D `attention_mask`, builds the causal+padding mask itself (plain ops, traceable) and
returns `logits` and `present.*`. Names and dynamic axes come from `runtime.io_spec.Contract`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch

from calibration import DataError
from calibration.batches import calibration_batches, describe_text
from pipeline.archs import export_spec, layer_kinds, longrope_switch, model_dims
from pipeline.artifacts import save_onnx, sha256_file
from pipeline.checkpoint import FloatWeights
from pipeline.configs import ExportConfig
from pipeline.errors import StageError
from pipeline.formats.compressed_tensors import HF_QUANTIZED_FOLDER, write_compressed_tensors
from pipeline.formats.genai import write_genai_config
from pipeline.formats.gguf import GGUF_FILE, GGUF_FOLDER, write_gguf
from pipeline.graph.float_zero import lower_float_zero_points
from pipeline.graph.fused import build_fused_graph, float_cache_graph, longrope_tables, to_float16
from pipeline.graph.lazy import save_streamed
from pipeline.graph.pack import pack_sibling_matmuls
from pipeline.graph.quant_ops import apply_block_quantized_ops, set_accuracy_level
from pipeline.graph.stamp import TRACED_LAYERS, can_stamp, stamp_layers, weights_by_name
from pipeline.graph.trace import export_graph, fake_model, real_buffers
from pipeline.graph.w8a8 import quantize_w8a8
from pipeline.models import TOKENIZER_FILES
from pipeline.quant.kv_int8 import RoundingCache, kv_scales
from pipeline.quant.plan import PLAN_FILE, decoder_linears
from pipeline.registry import StageResult, register_stage
from pipeline.resources import release_memory
from pipeline.streamed import load_streamed_model
from runtime.generate import Generator
from runtime.io_spec import Contract

COPIED_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
# max |logit difference| against PyTorch's float32 for a float16 graph: half precision's rounding
# over every layer, far below a broken graph's error (SmolLM2-135M measures 0.09)
FLOAT16_ATOL = 0.5
# the same for an int8 KV cache against PyTorch rounding its cache alike: float differences of 1e-6
# flip a code now and then, and a flip moves later layers (SmolLM2-135M: 0.37 max, 0.05 mean, with the
# prompt in the int8 graph; 0.12 with it through the float twin; the rounding itself moves logits by
# 1.2 max); a graph that misreads its scales is off by far more
INT8_KV_ATOL = 1.0
PREFILL_FILE, KV_SCALES_FILE = "model_prefill.onnx", "kv_scales.npy"  # an int8 cache's float prefill graph and scales


class KVCacheWrapper(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present), the contract's order."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        seq, total = input_ids.shape[1], attention_mask.shape[1]
        query_pos = torch.arange(total - seq, total, device=input_ids.device)
        key_pos = torch.arange(total, device=input_ids.device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        masks = {}
        for kind in dict.fromkeys(layer_kinds(self.model.config)):
            near = allowed
            if kind == "sliding_attention":  # the last `sliding_window` positions, this one included
                near = allowed & (key_pos[None, :] > query_pos[:, None] - self.model.config.sliding_window)[None, None]
            # an additive mask [B, 1, T, P+T]; a single finfo.min (never summed twice) keeps masked pad rows finite
            masks[kind] = torch.zeros(near.shape, dtype=torch.float32).masked_fill(
                ~near, torch.finfo(torch.float32).min
            )
        # one kind: the tensor; alternating kinds (Gemma 2 and 3): the per-kind mapping those models take
        mask = next(iter(masks.values())) if len(masks) == 1 else masks
        cache = DynamicCache()  # no config: every layer keeps all its positions, as the contract's cache does
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


@register_stage("export", ExportConfig, consumes="hf-model", produces="onnx")
def export(cfg: ExportConfig, inp, ctx) -> StageResult:
    # the graphs' weights stay in the checkpoint until each graph is saved (pipeline/graph/lazy.py); the PyTorch
    # reference the parity checks compare with holds one decoder layer at a time (pipeline/streamed.py)
    from transformers import AutoConfig

    arch = export_spec(AutoConfig.from_pretrained(inp.path))  # an unsupported model is named before any loading
    weights = FloatWeights(inp.path)
    model = load_streamed_model(inp.path)
    dims = model_dims(model.config)
    plan = json.loads((inp.path / PLAN_FILE).read_text()) if (inp.path / PLAN_FILE).exists() else {}
    activations = plan.get("activations")
    weights_kind = f"int8 W8A8 {activations}" if activations else "MatMulNBits" if plan else "float"
    contract = Contract(
        "portable", dims.num_layers, dims.num_kv_heads, dims.head_dim, dims.vocab_size, weights=weights_kind
    )
    out: Path = ctx.out_dir
    path = out / contract.model_file
    targets: dict[str, dict] = {}  # the other engines' formats, each in its own folder with a manifest
    if "hf-quantized" in cfg.targets and not activations:  # first: it refuses layouts it cannot hold before tracing
        targets["hf-quantized"] = _export_hf_quantized(inp.path, out, ctx, cfg.hf_quantized_dtype)
    if "gguf" in cfg.targets:
        targets["gguf"] = _export_gguf(inp.path, out, ctx)
    ctx.log(f"  tracing {model.config.model_type} ({dims.num_layers} layers) to ONNX opset {cfg.opset}")
    graph = _trace(model, inp.path, contract, cfg.opset, ctx.log)
    swapped = lowered = 0
    if plan.get("layers"):
        swapped = apply_block_quantized_ops(graph, inp.path, weights, accuracy_level=0)
        ctx.log(f"  {swapped} ops replaced by MatMulNBits / GatherBlockQuantized")
        if lowered := lower_float_zero_points(graph, weights):
            ctx.log(
                f"  {lowered} MatMulNBits with float zero points: integer zero points plus a correction matmul each"
            )
    save_streamed(graph, path, weights, cfg.external_data)
    del graph  # saved: each phase below starts from the checkpoint alone
    release_memory()
    for name in COPIED_FILES:
        if (inp.path / name).exists():
            shutil.copy2(inp.path / name, out / name)
    contract.save(out)
    write_genai_config(out, contract)  # onnxruntime_genai.Model(<this folder>) runs the portable graph
    graphs = {"portable": path}
    if cfg.fused and activations == "dynamic":
        ctx.log("  fused graph skipped: W8A8 dynamic is quantized by ONNX Runtime's tool on the portable graph")
    elif cfg.fused:
        int8_files = (
            {"prefill_model_file": PREFILL_FILE, "kv_scales_file": KV_SCALES_FILE} if cfg.kv_cache == "int8" else {}
        )
        fused = Contract(
            "fused",
            dims.num_layers,
            dims.num_kv_heads,
            dims.head_dim,
            dims.vocab_size,
            weights=weights_kind,
            max_positions=model.config.max_position_embeddings,
            dtype=cfg.dtype,
            kv_cache=cfg.kv_cache,
            **int8_files,
        )
        (out / "fused").mkdir()
        scales = None  # the int8 KV cache's, per layer (key, value)
        if cfg.kv_cache == "int8":
            cal = cfg.kv_calibration
            ctx.log(
                f"  int8 KV cache: per-channel scales from {cal.num_samples} x {cal.sequence_length} tokens of "
                + describe_text(cal.data)
            )
            try:
                batches = calibration_batches(cal, inp.path, "export.kv_calibration")
            except DataError as e:
                raise StageError(str(e)) from e
            scales = kv_scales(model, batches)
        ctx.log(
            f"  building the fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization; {cfg.dtype}, "
            f"KV cache {fused.kv_dtype})"
        )
        graph = build_fused_graph(model, weights, fused, cfg.opset, scales)
        if plan.get("layers"):
            apply_block_quantized_ops(graph, inp.path, weights, accuracy_level=0)
        if not activations:  # the per-token rewrite finds each linear's own MatMul; it shares their inputs' rounding
            ctx.log(f"  {pack_sibling_matmuls(graph)} groups of sibling linears packed into one matmul each")
        lower_float_zero_points(graph, weights)
        if cfg.dtype == "float16":
            ctx.log(f"  {to_float16(graph)} float tensors converted to float16")
        graphs["fused"] = out / "fused" / fused.model_file
        save_streamed(graph, graphs["fused"], weights, cfg.external_data)
        del graph
        release_memory()
        if scales is not None:
            np.save(out / "fused" / KV_SCALES_FILE, np.stack([np.stack([k[0, :, 0], v[0, :, 0]]) for k, v in scales]))
            _write_float_prefill(graphs["fused"], cfg.dtype)  # before parity, which runs prompts through it
        fused.save(out / "fused")
    parity, limits = {}, {}
    for flavour in graphs:
        int8_kv = flavour == "fused" and cfg.kv_cache == "int8"
        parity[flavour] = _parity(model, out, cfg.parity_tokens, flavour, scales if int8_kv else None)
        atol = limits[flavour] = (
            FLOAT16_ATOL
            if flavour == "fused" and cfg.dtype == "float16"
            else max(INT8_KV_ATOL, arch.atol)
            if int8_kv
            else arch.atol
        )
        ctx.log(
            f"  parity of the {flavour} graph: max |logits_onnx - logits_torch| = {parity[flavour]:.3g} (limit {atol:g})"
        )
        if parity[flavour] > atol:
            raise StageError(
                f"export parity ({flavour} graph): max |logits_onnx - logits_torch| = {parity[flavour]:.3g} exceeds "
                f"{atol:g} for {model.config.model_type}; the exported graph is wrong"
            )
    diff = max(parity.values())
    level, level_timings = cfg.accuracy_level, None
    if swapped and level == "auto":
        level, level_timings = _fastest_accuracy_level(out, graphs, cfg.int8_accuracy_level, ctx)
    elif level == "auto":
        level = 0  # no MatMulNBits to set
    if swapped and (level or cfg.int8_accuracy_level):  # parity was checked with float compute
        ctx.log(
            f"  MatMulNBits accuracy_level {level}"
            + (f", {cfg.int8_accuracy_level} for 8-bit layers" if cfg.int8_accuracy_level is not None else "")
        )
        for graph_path in graphs.values():  # attributes only: the weights stay where they are
            graph = onnx.load(str(graph_path), load_external_data=False)
            set_accuracy_level(graph, level, cfg.int8_accuracy_level)
            onnx.save(graph, str(graph_path))
    if activations:  # checked in float above; activation rounding is the validate stage's business
        ctx.log(f"  W8A8 {activations}: quantizing weights and activations in the graph")
        modules, scales, rotations = _w8a8_modules(plan, model), plan.get("input_scales"), plan.get("rotations") or {}
        for graph_path in graphs.values():  # the fused graph exists for our rewrites (per token, static) only
            _replace_graph(
                quantize_w8a8(graph_path, activations, modules, scales, rotations), graph_path, cfg.external_data
            )
        if "hf-quantized" in cfg.targets:  # the graphs' int8 codes exist only now
            targets["hf-quantized"] = _export_hf_quantized(inp.path, out, ctx, cfg.hf_quantized_dtype, w8a8_graph=path)
    if cfg.kv_cache == "int8" and "fused" in graphs:
        _write_float_prefill(graphs["fused"], cfg.dtype)  # again: the rewrites above changed the int8 graph
    size = {
        f: sum(p.stat().st_size for p in g.parent.iterdir() if p.name.startswith("model.onnx"))
        for f, g in graphs.items()
    }
    metrics = {
        "parity_max_abs_diff": diff,
        "onnx_bytes": size["portable"],
        "fused_onnx_bytes": size.get("fused", 0),
        "block_quantized_ops": swapped,
        "float_zero_point_matmuls": lowered,
    }
    for name, target in targets.items():
        metrics[f"{name.replace('-', '_')}_bytes"] = target["bytes"]
    targets = {"onnx": {"folder": ".", "graphs": sorted(graphs)}, **targets}
    return StageResult(
        metrics=metrics,
        info={
            "io_contract": contract.__dict__,
            "atol": arch.atol,
            "graphs": sorted(graphs),
            "accuracy_level": level,
            "accuracy_level_decode_ms": level_timings,
            "parity_by_graph": parity,
            "parity_limit_by_graph": limits,
            "targets": targets,
            "kv_cache": cfg.kv_cache,
        },
    )


def _fastest_accuracy_level(
    out: Path, graphs: dict[str, Path], int8_level: int | None, ctx, rounds: int = 3
) -> tuple[int, dict[int, list[float]]]:
    """`accuracy_level: auto`: time the runner's graph decoding with float (0) and int8 (4) MatMulNBits
    compute on this machine's CPU, in alternating rounds; int8 wins only when its median step is 3 %
    shorter. Only the graph's attributes change between candidates (its weights stay where they are)."""
    from runtime.settings import SessionSettings
    from runtime.tune import MARGIN, measure

    flavour = "fused" if "fused" in graphs else "portable"
    path = graphs[flavour]
    proto = onnx.load(str(path), load_external_data=False)
    timings: dict[int, list[float]] = {0: [], 4: []}
    try:
        for turn in range(rounds):
            for level in (0, 4) if turn % 2 == 0 else (4, 0):
                set_accuracy_level(proto, level, int8_level)
                onnx.save(proto, str(path))  # the tensors keep pointing at model.onnx.data
                timings[level].append(measure(out, SessionSettings(), "cpu", flavour, 1, 64, 32)[1])
    finally:
        set_accuracy_level(proto, 0, None)  # as parity checked it; the caller sets the choice on every graph
        onnx.save(proto, str(path))
    median = {level: float(np.median(times)) for level, times in timings.items()}
    chosen = 4 if median[4] < median[0] * (1 - MARGIN) else 0
    ctx.log(
        f"  accuracy_level auto: decode step {median[0]:.2f} ms with float compute (0), {median[4]:.2f} ms with "
        f"int8 compute (4) on this CPU ({flavour} graph) -> {chosen}"
    )
    return chosen, timings


def _export_gguf(source: Path, out: Path, ctx) -> dict:
    """llama.cpp's GGUF of the same weights in gguf/, with its own manifest; validated by the validate stage."""
    model_source = ctx.baseline.manifest.get("source") or {}
    source_gguf = Path(model_source["location"]) if model_source.get("kind") == "gguf" else None
    folder = out / GGUF_FOLDER
    folder.mkdir()
    path = folder / GGUF_FILE
    ctx.log("  writing GGUF for llama.cpp" + (f" (tokenizer from {source_gguf.name})" if source_gguf else ""))
    report = write_gguf(source, path, source_gguf)
    types: dict[str, int] = {}
    for t in report.tensors.values():
        types[t] = types.get(t, 0) + 1
    manifest = {
        "format": "gguf",
        "engine": "llama.cpp",
        "file": GGUF_FILE,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "tensor_types": types,
        "converted_layers": report.converted,
        "max_abs_weight_change_from_f16_scales": report.max_scale_rounding,
        "tokenizer": f"copied from {source_gguf}" if source_gguf else "built from tokenizer.json",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    ctx.log(
        f"  GGUF: {manifest['bytes'] / 2**20:.1f} MiB, tensors {types}"
        + (f", {len(report.converted)} layers re-quantized to Q8_0" if report.converted else "")
        + f"; float16 block scales move weights by at most {report.max_scale_rounding:.3g}"
    )
    return {"folder": GGUF_FOLDER, **manifest}


def _export_hf_quantized(source: Path, out: Path, ctx, dtype: str, w8a8_graph: Path | None = None) -> dict:
    """The same codes as a compressed-tensors checkpoint in hf-quantized/ (transformers, vLLM), with its own manifest."""
    folder = out / HF_QUANTIZED_FOLDER
    ctx.log("  writing the compressed-tensors checkpoint (transformers, vLLM)")
    report = write_compressed_tensors(source, folder, w8a8_graph, dtype)
    files = sorted(p for p in folder.iterdir())
    manifest = {
        "format": "compressed-tensors",
        "compression": report.format,
        "dtype": report.dtype,
        "engines": ["transformers", "vllm"],
        "bytes": sum(p.stat().st_size for p in files),
        "sha256": {p.name: sha256_file(p) for p in files},
        "schemes": {label: len(group.layers) for label, group in report.groups.items()},
        "float_linears": report.float_linears,
        "notes": report.notes,
        "vllm_compatible": not report.vllm_problems,
        "vllm_problems": report.vllm_problems,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    ctx.log(
        f"  hf-quantized: {manifest['bytes'] / 2**20:.1f} MiB, {manifest['schemes']}, "
        f"{len(report.float_linears)} linears float" + "".join(f"; {n}" for n in report.notes)
    )
    if report.vllm_problems:
        ctx.log(
            f"  hf-quantized: WARNING vLLM fuses q/k/v and gate/up into one matmul each and needs one scheme per "
            f"set; {len(report.vllm_problems)} sets mix schemes (first: {report.vllm_problems[0]}). transformers "
            "loads it; for vLLM quantize those siblings alike (overrides on all of them)"
        )
    return {"folder": HF_QUANTIZED_FOLDER, **manifest}


def _w8a8_modules(plan: dict, model) -> list[str]:
    """The linears the quantize stage chose for W8A8 (plans written before the ignore list applied: all of them)."""
    return plan["w8a8_modules"] if "w8a8_modules" in plan else decoder_linears(model)


def _trace(model, folder: Path, contract: Contract, opset: int, log) -> onnx.ModelProto:
    """The portable graph, traced from a fake copy of the model (shapes, no data: pipeline/graph/trace.py)
    whose weights come back as placeholders for the checkpoint's tensors. A model deeper than three layers
    is traced as a three-layer copy whose last layer is stamped out to the model's depth
    (pipeline/graph/stamp.py): tracing takes seconds at any depth. A model that cannot be stamped is traced
    whole. The parity check below compares the result with PyTorch either way."""
    weights = FloatWeights(folder)
    if can_stamp(model.config):
        small = dataclasses.replace(contract, num_layers=TRACED_LAYERS)
        traced = _trace_fake(model, small, opset, TRACED_LAYERS)
        stamped = stamp_layers(traced, _weight_sources(traced, weights, folder), model.config.num_hidden_layers, log)
        if stamped is not None:
            return stamped
    elif model.config.num_hidden_layers > TRACED_LAYERS:
        log("  tracing the whole model: its decoder layers are of several kinds")
    traced = _trace_fake(model, contract, opset)
    _weight_sources(traced, weights, folder)
    return traced


def _weight_sources(traced: onnx.ModelProto, weights: FloatWeights, folder: Path) -> dict[str, tuple[str, bool]]:
    """The traced graph's weights as placeholders for the checkpoint's tensors (stamp.weights_by_name)."""
    sources = weights_by_name(traced, weights)
    if sources is None:
        raise StageError(f"export: a traced weight of {folder} is named after no checkpoint tensor")
    return sources


def _trace_fake(model, contract: Contract, opset: int, layers: int | None = None) -> onnx.ModelProto:
    """The exporter's graph of a fake copy of `model` (its first `layers` decoder layers), weights as graph
    inputs; `model`, real, gives the computed buffers (rotary frequencies) and longrope's tables."""
    fake = fake_model(model.config, layers, model.config._attn_implementation)
    with _traceable_longrope(fake, model):
        return export_graph(KVCacheWrapper(fake), contract, opset, real_buffers(model))


@contextlib.contextmanager
def _traceable_longrope(fake, real):
    """transformers 5 switches longrope's factors by copying into a buffer, which a trace cannot follow (4.x
    switches in Python, which a trace freezes): while tracing, the rotary module makes the same choice (long
    tables once the largest position reaches the original length) as a `where` between the tables `real`'s
    rotary module computes for each case."""
    switch = longrope_switch(real.config)
    if switch is None:
        yield
        return
    rotary = fake.model.rotary_emb
    long, short = longrope_tables(real, "full_attention", switch)

    def forward(x, position_ids, *args, **kwargs):
        is_long = position_ids.max() + 1 > switch
        return tuple(
            torch.where(is_long, lt[position_ids], st[position_ids]).to(x.dtype) for lt, st in zip(long, short)
        )

    rotary.forward = forward
    try:
        yield
    finally:
        del rotary.forward  # the class's own again


def _write_float_prefill(int8_graph: Path, dtype: str) -> None:
    """The int8-cache graph's float-cache twin beside it, reading the same weights file."""
    proto = onnx.load(str(int8_graph), load_external_data=False)
    onnx.save(float_cache_graph(proto, dtype), str(int8_graph.parent / PREFILL_FILE))


def _replace_graph(graph: onnx.ModelProto, path: Path, external_data: bool) -> None:
    """Overwrite the saved graph (and its external data) with `graph`, already held in memory."""
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    save_onnx(graph, path, external_data)


def _parity(model, folder: Path, tokens: int, graph: str, int8_kv_scales: list | None = None) -> float:
    """Prefill half the tokens, decode the rest one by one with the ONNX KV cache, and compare
    every step's logits with PyTorch recomputing the whole sequence without a cache (with `int8_kv_scales`:
    through a cache that rounds keys and values to int8 as the graph does; step by step when the prompt
    runs through the float prefill graph, whose own attention reads them unrounded)."""
    gen = Generator(folder, provider="cpu", graph=graph)
    ids = np.random.default_rng(0).integers(0, gen.contract.vocab_size, size=(1, tokens)).astype(np.int64)
    split = tokens // 2
    logits, state = gen.prefill([ids[0, :split].tolist()], tokens)
    onnx_steps = [logits]
    for t in range(split, tokens - 1):
        logits = gen.decode(ids[:, t], state)
        onnx_steps.append(logits)
    with torch.no_grad():
        if gen.float_prefill is not None:  # the prompt attends in float, its keys and values are stored rounded
            cache = RoundingCache(int8_kv_scales, float_prompt=True)
            rows = [model(torch.from_numpy(ids[:, :split]), past_key_values=cache, use_cache=True).logits[0, -1:]]
            rows += [
                model(torch.from_numpy(ids[:, t : t + 1]), past_key_values=cache, use_cache=True).logits[0]
                for t in range(split, tokens - 1)
            ]
            ref = torch.cat(rows).numpy()
        else:
            cache = RoundingCache(int8_kv_scales) if int8_kv_scales is not None else None
            ref = model(torch.from_numpy(ids[:, : tokens - 1]), past_key_values=cache, use_cache=cache is not None)
            ref = ref.logits[0, split - 1 :].numpy()  # [steps, V]
    return float(np.abs(np.concatenate(onnx_steps, axis=0) - ref).max())
