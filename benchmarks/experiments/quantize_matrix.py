"""Quantization matrix on the reference model: perplexity, KL, agreement, size, decode speed, wall time.

    .venv/bin/python -m benchmarks.experiments.quantize_matrix [--only NAME ...] [--windows 40]

Each variant is a recipe (model -> quantize -> export -> validate) run through `pipeline.run`
into artifacts/bench-quant/<name>/; the validate stage's protocol gives the accuracy figures
(WikiText-2 test, 512-token windows, first --windows windows; calibration on WikiText-2 valid).
Prints a Markdown table and merges its rows into benchmarks/results/quantize/quantize_matrix.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from pipeline import ValidationFailed, run
from runtime import Generator, find_model_folder

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "artifacts" / "bench-quant"
RESULTS = ROOT / "benchmarks" / "results" / "quantize"
W8A8_CALIBRATION = {"num_samples": 32, "sequence_length": 256}

VARIANTS = {
    "fp32": None,
    "int8-rtn-g128": {"method": "rtn", "bits": 8, "group_size": 128},
    "int8-rtn-g128-acc4": {"method": "rtn", "bits": 8, "group_size": 128},
    "int4-rtn-asym-g32": {"method": "rtn", "group_size": 32},
    "int4-rtn-sym-g32": {"method": "rtn", "group_size": 32, "symmetric": True},
    "int4-rtn-asym-g128": {"method": "rtn", "group_size": 128},
    "int4-rtn-sym-g128": {"method": "rtn", "group_size": 128, "symmetric": True},
    "int4-gptq-asym-g32": {"method": "gptq", "group_size": 32},
    "int4-gptq-sym-g32": {"method": "gptq", "group_size": 32, "symmetric": True},
    "int4-gptq-asym-g128": {"method": "gptq", "group_size": 128},
    "int4-gptq-sym-g128": {"method": "gptq", "group_size": 128, "symmetric": True},
    "int8-w8a8-dynamic": {"method": "w8a8", "w8a8": {"activations": "dynamic"}},
    "int8-w8a8-static": {"method": "w8a8", "w8a8": {"activations": "static"}, "calibration": W8A8_CALIBRATION},
    "int8-w8a8-static-smoothquant": {
        "method": "w8a8",
        "w8a8": {"activations": "static", "smoothquant": 0.5},
        "calibration": W8A8_CALIBRATION,
    },
    "int8-w8a8-dynamic-smoothquant-auto": {
        "method": "w8a8",
        "w8a8": {"activations": "dynamic", "smoothquant": "auto"},
        "calibration": W8A8_CALIBRATION,
    },
    "int8-w8a8-static-smoothquant-auto": {
        "method": "w8a8",
        "w8a8": {"activations": "static", "smoothquant": "auto"},
        "calibration": W8A8_CALIBRATION,
    },
    "int8-w8a8-static-smoothquant-auto-hadamard": {
        "method": "w8a8",
        "w8a8": {"activations": "static", "smoothquant": "auto", "hadamard": True},
        "calibration": W8A8_CALIBRATION,
    },
    "int8-w8a8-dynamic-per-token": {"method": "w8a8", "w8a8": {"activations": "dynamic_per_token"}},
    "int8-w8a8-dynamic-per-token-smoothquant-auto": {
        "method": "w8a8",
        "w8a8": {"activations": "dynamic_per_token", "smoothquant": "auto"},
        "calibration": W8A8_CALIBRATION,
    },
    "int8-w8a8-dynamic-per-token-smoothquant-auto-hadamard": {
        "method": "w8a8",
        "w8a8": {"activations": "dynamic_per_token", "smoothquant": "auto", "hadamard": True},
        "calibration": W8A8_CALIBRATION,
    },
    "int8-w8a8-dynamic-per-token-smoothquant-auto-int8-head": {
        "method": "w8a8",
        "w8a8": {"activations": "dynamic_per_token", "smoothquant": "auto"},
        "lm_head": "int8",
        "calibration": W8A8_CALIBRATION,
    },
    "int8-w8a8-dynamic-float-down": {
        "method": "w8a8",
        "w8a8": {"activations": "dynamic"},
        "ignore": [r"mlp\.down_proj"],
    },
    "int8-w8a8-static-smoothquant-float-down": {
        "method": "w8a8",
        "w8a8": {"activations": "static", "smoothquant": 0.5},
        "ignore": [r"mlp\.down_proj"],
        "calibration": W8A8_CALIBRATION,
    },
    "int4-awq-asym-g32": {"method": "awq", "awq": {"codes": "clip"}, "group_size": 32},
    "int4-awq-sym-g32": {"method": "awq", "awq": {"codes": "clip"}, "group_size": 32, "symmetric": True},
    "int4-awq-asym-g128": {"method": "awq", "awq": {"codes": "clip"}, "group_size": 128},
    "int4-awq-sym-g128": {"method": "awq", "awq": {"codes": "clip"}, "group_size": 128, "symmetric": True},
    # GPTQ and AWQ as the papers have them: no least-squares refit of the group scales once the codes are chosen
    "int4-gptq-asym-g32-no-refit": {"method": "gptq", "group_size": 32, "refit_scales": False},
    "int4-gptq-asym-g128-no-refit": {"method": "gptq", "group_size": 128, "refit_scales": False},
    "int4-awq-asym-g32-no-refit": {"method": "awq", "awq": {"codes": "clip"}, "group_size": 32, "refit_scales": False},
    "int4-awq-sym-g32-no-refit": {
        "method": "awq",
        "awq": {"codes": "clip"},
        "group_size": 32,
        "symmetric": True,
        "refit_scales": False,
    },
    "int4-awq-asym-g128-no-refit": {
        "method": "awq",
        "awq": {"codes": "clip"},
        "group_size": 128,
        "refit_scales": False,
    },
    "int4-awq-sym-g128-no-refit": {
        "method": "awq",
        "awq": {"codes": "clip"},
        "group_size": 128,
        "symmetric": True,
        "refit_scales": False,
    },
    # refit with cyclic coordinate descent on the codes between scale refits
    "int4-gptq-asym-g32-descent": {"method": "gptq", "group_size": 32, "code_descent": True},
    "int4-gptq-asym-g128-descent": {"method": "gptq", "group_size": 128, "code_descent": True},
    "int4-awq-asym-g32-descent": {"method": "awq", "awq": {"codes": "clip"}, "group_size": 32, "code_descent": True},
    "int4-awq-sym-g32-descent": {
        "method": "awq",
        "awq": {"codes": "clip"},
        "group_size": 32,
        "symmetric": True,
        "code_descent": True,
    },
    "int4-awq-asym-g128-descent": {"method": "awq", "awq": {"codes": "clip"}, "group_size": 128, "code_descent": True},
    "int4-awq-sym-g128-descent": {
        "method": "awq",
        "awq": {"codes": "clip"},
        "group_size": 128,
        "symmetric": True,
        "code_descent": True,
    },
    # AWQ's scaling, then GPTQ's codes on the scaled weights (awq.codes: gptq)
    "int4-awq-gptq-asym-g32": {"method": "awq", "group_size": 32, "awq": {"codes": "gptq"}},
    "int4-awq-gptq-asym-g128": {"method": "awq", "group_size": 128, "awq": {"codes": "gptq"}},
    "int4-awq-gptq-sym-g128": {"method": "awq", "group_size": 128, "symmetric": True, "awq": {"codes": "gptq"}},
    # the scale searched on each linear's own output instead of the attention block's / MLP's
    "int4-awq-asym-g32-linear": {"method": "awq", "awq": {"codes": "clip", "objective": "linear"}, "group_size": 32},
    "int4-awq-sym-g32-linear": {
        "method": "awq",
        "awq": {"codes": "clip", "objective": "linear"},
        "group_size": 32,
        "symmetric": True,
    },
    "int4-awq-asym-g128-linear": {"method": "awq", "awq": {"codes": "clip", "objective": "linear"}, "group_size": 128},
    "int4-awq-sym-g128-linear": {
        "method": "awq",
        "awq": {"codes": "clip", "objective": "linear"},
        "group_size": 128,
        "symmetric": True,
    },
    # float zero points: each block's grid spans its exact range (llama.cpp's Q4_1 layout). At g32 this model's
    # weights (dequantized Q4_1) are re-found exactly; at g128 the grids do not line up, the general case
    "int4-rtn-asym-g32-float-zero": {"method": "rtn", "group_size": 32, "zero_point": "float"},
    "int4-rtn-asym-g128-float-zero": {"method": "rtn", "group_size": 128, "zero_point": "float"},
    "int4-gptq-asym-g128-float-zero": {"method": "gptq", "group_size": 128, "zero_point": "float"},
    "int4-awq-asym-g128-float-zero": {
        "method": "awq",
        "awq": {"codes": "clip"},
        "group_size": 128,
        "zero_point": "float",
    },
    "int4-gptq-asym-g32-budget100": {
        "method": "gptq",
        "group_size": 32,
        "lm_head": "int4",
        "embedding": "int4",
        "budget": {"max_size_mb": 98},
    },
    "int4-gptq-asym-g32-mixed": {
        "method": "gptq",
        "group_size": 32,
        "overrides": {r"mlp\.down_proj": 8},
        "lm_head": "int4",
        "embedding": "int4",
    },
}


EXPORT = {"int8-rtn-g128-acc4": {"accuracy_level": 4}}  # export settings other than the defaults


def recipe_for(name: str, quantize: dict | None, windows: int) -> Path:
    stages = ([{"quantize": quantize}] if quantize else []) + [
        {"export": EXPORT.get(name, {})},
        {"validate": {"max_windows": windows, "thresholds": {"decode_logits_max_abs_diff": 0.01}}},
    ]
    path = OUT / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": name, "model": {"source": str(GGUF)}, "stages": stages}, sort_keys=False))
    return path


def decode_speed(export: Path, new_tokens: int = 64) -> float:
    gen = Generator(export, provider="cpu")
    prompt = gen.tokenizer.encode(
        "The history of the city begins in the early middle ages, when", add_special_tokens=False
    )
    gen.generate([prompt], 8, ignore_eos=True)  # warm-up
    return gen.generate([prompt], new_tokens, ignore_eos=True).decode_tokens_per_second


def measure(name: str, quantize: dict | None, windows: int) -> dict:
    started = time.time()
    try:
        run_dir = run(recipe_for(name, quantize, windows), workdir=OUT)
    except ValidationFailed:
        run_dir = OUT / name  # the report is kept; the figures are still worth printing
    wall = time.time() - started
    report = json.loads(next(run_dir.glob("*-validate-*/report.json")).read_text())
    export = find_model_folder(run_dir)
    quant = next(run_dir.glob("*-quantize-*/manifest.json"), None)
    m = report["metrics"]
    return {
        "variant": name,
        "perplexity": m["perplexity"],
        "baseline": m["perplexity_baseline"],
        "delta_pct": m["perplexity_delta_pct"],
        "kl": m["kl_divergence"],
        "top1_agreement": m["top1_agreement"],
        "greedy_agreement": m["greedy_token_agreement"],
        "onnx_mb": sum(p.stat().st_size for p in export.glob("model.onnx*")) / 1e6,
        "decode_tok_s": decode_speed(export),
        "quantize_s": json.loads(quant.read_text())["timing"]["seconds"] if quant else 0.0,
        "run_wall_s": wall,
        "windows": report["protocol"]["windows"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    rows = [measure(n, VARIANTS[n], args.windows) for n in (args.only or VARIANTS)]
    header = "| variant | perplexity | Δ % | KL | top-1 agr. | greedy agr. | ONNX MB | decode tok/s | quantize s |"
    print(header + "\n" + "|---" * 9 + "|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | "
            f"{r['greedy_agreement']:.2f} | {r['onnx_mb']:.0f} | {r['decode_tok_s']:.1f} | {r['quantize_s']:.0f} |"
        )
    out = RESULTS / "quantize_matrix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing.update({r["variant"]: r for r in rows})
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
