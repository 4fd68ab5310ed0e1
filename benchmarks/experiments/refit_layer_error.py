"""How much of a layer's output error the refit and code descent remove, layer by layer on the reference model.

    .venv/bin/python -m benchmarks.experiments.refit_layer_error [--tokens 2048]

For five decoder linears of SmolLM2 (float inputs from 8 x 512 tokens of WikiText-2 valid, --tokens of them
sampled, as AWQ's searches take), each INT4 scheme's output error |X (Ŵ - W)ᵀ|² on those tokens for: AWQ's
clip-searched RTN (the reference, 1.0), then refit_scales, then refit with code_descent, then GPTQ (its own
Hessian on the same tokens), then GPTQ refitted with code descent. A fit on the calibration tokens, not a
held-out figure: `quantize_matrix.py` measures what reaches perplexity. Prints a table and writes
benchmarks/results/quantize/refit_layer_error.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from calibration import load_text, sample_blocks
from pipeline.models import load_torch_model
from pipeline.quant.awq import search_clip
from pipeline.quant.gptq import gptq
from pipeline.quant.primitives import QuantScheme, dequantize, quantize
from pipeline.quant.refit import padded_gram, refit_scales
from runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "quantize" / "refit_layer_error.json"
LAYERS = (
    "model.layers.3.self_attn.q_proj",
    "model.layers.3.self_attn.o_proj",
    "model.layers.10.mlp.down_proj",
    "model.layers.20.mlp.gate_proj",
    "model.layers.29.mlp.down_proj",
)
SCHEMES = (
    QuantScheme(4, 128, False),
    QuantScheme(4, 128, True),
    QuantScheme(4, 32, False),
    QuantScheme(4, 128, False, True),
)


def layer_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, a, _o, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in LAYERS
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="float checkpoint (default: the fp32 recipe's model step)")
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    src = args.model or next((ROOT / "artifacts" / "smollm2-fp32").glob("00-model-*"))
    model = load_torch_model(src).eval()
    valid = np.array(Tokenizer(src).encode(load_text("wikitext-2", "valid"), add_special_tokens=False), dtype=np.int64)
    inputs = layer_inputs(model, torch.from_numpy(sample_blocks(valid, 512, 8, 0)))
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(
        "| scheme | layer | RTN (clip-searched) | refit | refit + descent | GPTQ | GPTQ + refit + descent | s: refit / + descent |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for scheme in SCHEMES:
        for name in LAYERS:
            x = inputs[name][torch.randperm(len(inputs[name]), generator=gen)[: args.tokens]]
            w = model.get_submodule(name).weight.data

            def error(qt) -> float:
                return float((x @ (dequantize(qt) - w).T).pow(2).sum())

            base = quantize(w, scheme, search_clip(x, w, scheme))
            gram = padded_gram(x, scheme.group_size)
            t = time.perf_counter()
            refit = refit_scales(base, w, gram)
            t_refit = time.perf_counter() - t
            t = time.perf_counter()
            descended = refit_scales(base, w, gram, descent=True)
            t_descent = time.perf_counter() - t
            h = x.T @ x
            g = gptq(w, h, scheme)
            row = {
                "scheme": scheme.label,
                "layer": name,
                "rtn_error": error(base),
                "refit": error(refit) / error(base),
                "refit_descent": error(descended) / error(base),
                "gptq": error(g) / error(base),
                "gptq_refit_descent": error(refit_scales(g, w, h, descent=True)) / error(base),
                "refit_s": t_refit,
                "refit_descent_s": t_descent,
            }
            rows.append(row)
            print(
                f"| {row['scheme']} | {name} | 1 ({row['rtn_error']:.4g}) | {row['refit']:.3f} | {row['refit_descent']:.3f} "
                f"| {row['gptq']:.3f} | {row['gptq_refit_descent']:.3f} | {t_refit:.2f} / {t_descent:.2f} |"
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=1))
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
