"""Where one decoder layer's GPTQ time goes at real size, phase by phase.

    .venv/bin/python -m benchmarks.experiments.gptq_layer_speed [--config smollm2-1.7b] [--samples 32] [--out FILE]

One decoder layer of a scale-ladder config's shape (random weights: right for time, never for accuracy) over
`--samples` calibration blocks of 512 random hidden states, timed as the quantize stage runs it: the layer's
forward, the Hessians of its linears' inputs (the hooked forward included), then for each linear GPTQ's codes
(act-order, least-error ranges) and the scale refit, as `int4-gptq.yaml` sets them (asymmetric, groups of 32).
Prints a table and writes JSON with the machine, versions, commit and command
(default benchmarks/results/quantize/gptq_layer_speed.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from calibration.collect import run_layer
from pipeline.bench.system import envelope
from pipeline.quant.gptq import gptq
from pipeline.quant.primitives import QuantScheme
from pipeline.quant.refit import refit_scales
from pipeline.stages.quantize.gptq import _collect_hessians

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "benchmarks" / "checks" / "scale_configs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smollm2-1.7b", help="a config in benchmarks/checks/scale_configs/")
    parser.add_argument("--samples", type=int, default=32, help="calibration blocks of 512 tokens")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize" / "gptq_layer_speed.json"
    )
    args = parser.parse_args()
    info = envelope(" ".join(["python -m benchmarks.experiments.gptq_layer_speed", *sys.argv[1:]]))
    config = AutoConfig.for_model(**json.loads((CONFIGS / f"{args.config}.json").read_text()))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).eval()
    hidden = [torch.randn(1, 512, config.hidden_size) for _ in range(args.samples)]
    positions = torch.arange(512)[None]
    rotary = LlamaRotaryEmbedding(config)(hidden[0], positions)
    kwargs = [{"position_embeddings": rotary, "position_ids": positions, "attention_mask": None} for _ in hidden]
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)

    rows = []
    started = time.perf_counter()
    run_layer(layer, hidden, kwargs)
    rows.append({"phase": "forward (the quantized layer, for the next one)", "seconds": time.perf_counter() - started})
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    started = time.perf_counter()
    hessians = _collect_hessians(layer, linears, hidden, kwargs)
    rows.append({"phase": "Hessians (with their forward)", "seconds": time.perf_counter() - started})
    for name, module in linears.items():
        weight, H = module.weight.data, hessians[name].H
        started = time.perf_counter()
        codes = gptq(weight, H, scheme)
        middle = time.perf_counter()
        refit_scales(codes, weight, H)
        done = time.perf_counter()
        shape = f"{weight.shape[0]} x {weight.shape[1]}"
        rows.append({"phase": f"{name} GPTQ", "shape": shape, "seconds": middle - started})
        rows.append({"phase": f"{name} refit", "shape": shape, "seconds": done - middle})
    total = sum(r["seconds"] for r in rows)
    for r in rows:
        r["seconds"] = round(r["seconds"], 2)
    print(f"{args.config}: one decoder layer, {args.samples} x 512 tokens")
    for r in rows:
        print(f"  {r['phase']:<40} {r.get('shape', ''):>12} {r['seconds']:>8.1f} s")
    print(f"  {'total':<40} {'':>12} {total:>8.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {**info, "config": args.config, "samples": args.samples, "total_seconds": round(total, 1), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
