"""Probe for an int8 KV cache on the CPU provider: what ONNX Runtime's GroupQueryAttention gains or
loses in time with int8 past/present buffers, and what static int8 K/V cost in perplexity on the
reference model. It decided the export's `kv_cache: int8` (built since); `optimize bench` measures
the whole model with it.

    .venv/bin/python -m benchmarks.experiments.kv_int8_probe artifacts/smollm2-fp32 [--repeats 30] [--out FILE.json]

Part 1 times a decode step of 30 chained GroupQueryAttention nodes with SmolLM2-135M's shapes
(9 query heads, 3 KV heads, head size 64, rotary inside, a 512-position cache shared by past and
present through IO binding), at batch 1 and 8 and 40 and 350 cached positions, with a float32
cache and with int8 caches (`kv_cache_bit_width` 8; `k_quant_type`/`v_quant_type` PER_TENSOR and
PER_CHANNEL, static scales). Then a batch-1 prompt of 128 and 512 tokens through the same chain
(the prefill, which reads the int8 cache it has just written). Only attention: no matmuls, so read
it against the whole decode step that `cpu_decode_profile.py` measures.

Part 2 runs the fp32 checkpoint in PyTorch with K (after the rotary embedding, as the kernel stores
it) and V rounded to int8 by the export's own `RoundingCache`, with static symmetric scales, max |x|
over 16 x 512 tokens of WikiText-2 valid (`kv_scales`), one scale per KV channel or their maximum per
layer (per tensor), and scores WikiText-2 test with the validate stage's windows (40 x 512 tokens).

Prints Markdown tables and writes benchmarks/results/kernels/kv_int8_probe.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from benchmarks.experiments.distill_matrix import perplexity  # the same windows as validate's, through PyTorch)
from calibration import load_text, sample_blocks
from pipeline.quant.kv_int8 import RoundingCache, kv_scales
from runtime.tokenizer import Tokenizer

OUT = Path(__file__).resolve().parents[1] / "results" / "kernels" / "kv_int8_probe.json"
HEADS, KV_HEADS, HEAD, MAX_LEN, LAYERS, THREADS = 9, 3, 64, 512, 30, 2
KINDS = {"float32": None, "int8 per tensor": "PER_TENSOR", "int8 per channel": "PER_CHANNEL"}


def attention_chain(batch: int, quant: str | None, seq: int = 1) -> bytes:
    """30 GroupQueryAttention nodes; each output, padded back to the packed QKV width, feeds the next."""
    cache = TensorProto.FLOAT if quant is None else TensorProto.INT8
    width = (HEADS + 2 * KV_HEADS) * HEAD
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [batch, seq, width]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [batch]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.random((MAX_LEN, HEAD // 2), dtype=np.float32), n) for n in ("cos", "sin")]
    inits.append(numpy_helper.from_array(np.zeros((batch, seq, width - HEADS * HEAD), np.float32), "pad"))
    if quant is not None:
        shape = [1] if quant == "PER_TENSOR" else [KV_HEADS, 1, HEAD]
        inits += [numpy_helper.from_array(np.full(shape, 0.05, np.float32), n) for n in ("k_scale", "v_scale")]
    nodes, outputs, x = [], [], "qkv"
    for i in range(LAYERS):
        shape = [batch, KV_HEADS, MAX_LEN, HEAD]
        inputs += [helper.make_tensor_value_info(f"past_{kv}{i}", cache, shape) for kv in "kv"]
        outputs += [helper.make_tensor_value_info(f"present_{kv}{i}", cache, shape) for kv in "kv"]
        args = [x, "", "", f"past_k{i}", f"past_v{i}", "seqlens_k", "total", "cos", "sin"]
        attrs = {"num_heads": HEADS, "kv_num_heads": KV_HEADS, "do_rotary": 1}
        if quant is not None:
            args += ["", "", "", "k_scale", "v_scale"]
            attrs.update(k_quant_type=quant, v_quant_type=quant, kv_cache_bit_width=8)
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                args,
                [f"o{i}", f"present_k{i}", f"present_v{i}"],
                domain="com.microsoft",
                **attrs,
            )
        )
        nodes.append(helper.make_node("Concat", [f"o{i}", "pad"], [f"x{i}"], axis=2))
        x = f"x{i}"
    outputs.insert(0, helper.make_tensor_value_info(x, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "gqa_chain", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return model.SerializeToString()


def time_attention(batch: int, past: int, quant: str | None, repeats: int, prompt: int = 0) -> float:
    """Median ms of one step of the chain, the caches bound in place as the runner binds them: a decode
    step over `past` cached positions, or with `prompt` a first prompt of that many tokens."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    seq = prompt or 1
    session = ort.InferenceSession(attention_chain(batch, quant, seq), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", rng.standard_normal((batch, seq, (HEADS + 2 * KV_HEADS) * HEAD), dtype=np.float32))
    binding.bind_cpu_input("seqlens_k", np.full(batch, prompt - 1 if prompt else past, np.int32))
    binding.bind_cpu_input("total", np.array(prompt or MAX_LEN, np.int32))
    caches = []
    for i in range(LAYERS):
        for kv in "kv":
            shape = (batch, KV_HEADS, MAX_LEN, HEAD)
            data = rng.standard_normal(shape, dtype=np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(data if quant is None else (data * 40).astype(np.int8))
            caches.append(value)
            binding.bind_ortvalue_input(f"past_{kv}{i}", value)
            binding.bind_ortvalue_output(f"present_{kv}{i}", value)
    binding.bind_output(session.get_outputs()[0].name)
    for _ in range(5):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a run folder with the fp32 model step (artifacts/smollm2-fp32)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    speed = []
    print(
        f"onnxruntime {ort.__version__}, {THREADS} threads: {LAYERS} GroupQueryAttention nodes, one decode step, ms (median)"
    )
    print("\n| batch | cached positions | " + " | ".join(KINDS) + " |\n|---|---|" + "---|" * len(KINDS))
    for batch, past in ((1, 40), (1, 350), (8, 40), (8, 350)):
        row = {"batch": batch, "past": past} | {
            k: time_attention(batch, past, q, args.repeats) for k, q in KINDS.items()
        }
        speed.append(row)
        print(f"| {batch} | {past} | " + " | ".join(f"{row[k]:.2f}" for k in KINDS) + " |", flush=True)
    prefill = []
    print("\n| prompt tokens (batch 1, first prompt) | " + " | ".join(KINDS) + " |\n|---|" + "---|" * len(KINDS))
    for prompt in (128, 512):
        row = {"prompt": prompt} | {
            k: time_attention(1, 0, q, max(3, args.repeats // 4), prompt) for k, q in KINDS.items()
        }
        prefill.append(row)
        print(f"| {prompt} | " + " | ".join(f"{row[k]:.1f}" for k in KINDS) + " |", flush=True)

    from transformers import AutoModelForCausalLM

    folder = next(p for p in sorted(args.artifact.glob("00-model-*")) if (p / "config.json").exists())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = Tokenizer(folder)
    test = np.array(tokenizer.encode(load_text("wikitext-2", "test"), add_special_tokens=False), dtype=np.int64)
    valid = np.array(tokenizer.encode(load_text("wikitext-2", "valid"), add_special_tokens=False), dtype=np.int64)
    calibration = torch.from_numpy(sample_blocks(valid, 512, 16, 0))
    per_channel = kv_scales(model, list(calibration.split(4)))  # what the export's `kv_cache: int8` uses
    per_tensor = [
        tuple(np.full_like(s, s.max()) for s in pair) for pair in per_channel
    ]  # max over the channels' maxima
    with torch.no_grad():
        accuracy = {
            "float32": perplexity(model, test),
            "int8 per tensor": perplexity(model, test, cache=lambda: RoundingCache(per_tensor)),
            "int8 per channel": perplexity(model, test, cache=lambda: RoundingCache(per_channel)),
        }
    print("\n| KV cache | WikiText-2 test perplexity | vs float32 |\n|---|---|---|")
    for name, ppl in accuracy.items():
        print(f"| {name} | {ppl:.3f} | {(ppl / accuracy['float32'] - 1) * 100:+.2f} % |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "onnxruntime": ort.__version__,
                "threads": THREADS,
                "attention_ms": speed,
                "prefill_attention_ms": prefill,
                "perplexity": accuracy,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
