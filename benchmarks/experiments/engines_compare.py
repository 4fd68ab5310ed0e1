"""The same quantized weights through every engine the export writes for: our runner, onnxruntime-genai,
llama.cpp (GGUF) and transformers + compressed-tensors (hf-quantized, what vLLM reads).

    .venv/bin/python -m benchmarks.experiments.engines_compare [--windows 40] [--only NAME ...]

Each variant is a recipe run into artifacts/bench-engines/: the shipped recipes/smollm2-int4-engines.yaml
(GPTQ asymmetric g32, float compute in the ONNX graph), the same with MatMulNBits' int8 compute
(accuracy_level 4; it reuses the first run's quantize step), the first with hf-quantized written in
bfloat16, and W8A8 (ONNX Runtime's dynamic, our
per-token dynamic, our static with SmoothQuant 0.5 and auto) exported to onnx and hf-quantized. `--only` re-measures the
named variants and keeps the other rows of the last results. The validate stage measures every target on the same WikiText-2
test windows and prompts; this script collects its numbers (a run whose gates fail is reported with
its failures, not dropped). Needs `make engines`. Prints a Markdown table and writes
benchmarks/results/engines/engines_compare.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from pipeline import ValidationFailed, run

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORK = ROOT / "artifacts" / "bench-engines"
RESULTS = ROOT / "benchmarks" / "results" / "engines"
ENGINES = {
    "genai": "onnxruntime-genai",
    "gguf": "llama.cpp (GGUF)",
    "hf_quantized": "transformers + compressed-tensors",
}
W8A8_CALIBRATION = {"num_samples": 32, "sequence_length": 256}


def variants() -> dict[str, dict]:
    shipped = yaml.safe_load((ROOT / "recipes" / "smollm2-int4-engines.yaml").read_text())
    shipped["model"]["source"] = str(GGUF)
    quantize, export, validate = (next(iter(s.values())) for s in shipped["stages"])

    def with_stages(name: str, q: dict, e: dict, thresholds: dict) -> dict:
        return {
            **shipped,
            "name": name,
            "stages": [{"quantize": q}, {"export": e}, {"validate": {**validate, "thresholds": thresholds}}],
        }

    w8a8_gates = {k: v for k, v in validate["thresholds"].items() if not k.startswith("gguf")}
    return {
        "int4-gptq-g32-float-compute": with_stages("int4-gptq-g32", quantize, export, validate["thresholds"]),
        "int4-gptq-g32-int8-compute": with_stages(
            "int4-gptq-g32", quantize, {**export, "accuracy_level": 4}, validate["thresholds"]
        ),
        "int4-gptq-g32-hf-bfloat16": with_stages(
            "int4-gptq-g32", quantize, {**export, "hf_quantized_dtype": "bfloat16"}, validate["thresholds"]
        ),
        "int8-w8a8-dynamic": with_stages(
            "int8-w8a8-dynamic",
            {"method": "w8a8", "w8a8": {"activations": "dynamic"}},
            {"targets": ["onnx", "hf-quantized"]},
            w8a8_gates,
        ),
        "int8-w8a8-dynamic-per-token": with_stages(
            "int8-w8a8-dynamic-per-token",
            {"method": "w8a8", "w8a8": {"activations": "dynamic_per_token"}},
            {"targets": ["onnx", "hf-quantized"]},
            w8a8_gates,
        ),
        "int8-w8a8-static-smoothquant": with_stages(
            "int8-w8a8-static-smoothquant",
            {"method": "w8a8", "w8a8": {"activations": "static", "smoothquant": 0.5}, "calibration": W8A8_CALIBRATION},
            {"targets": ["onnx", "hf-quantized"]},
            w8a8_gates,
        ),
        "int8-w8a8-static-smoothquant-auto": with_stages(
            "int8-w8a8-static-smoothquant-auto",
            {
                "method": "w8a8",
                "w8a8": {"activations": "static", "smoothquant": "auto"},
                "calibration": W8A8_CALIBRATION,
            },
            {"targets": ["onnx", "hf-quantized"]},
            w8a8_gates,
        ),
    }


def measure(name: str, recipe: dict, windows: int) -> dict:
    recipe["stages"][2]["validate"]["max_windows"] = windows
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.time()
    try:
        folder = run(path, workdir=WORK)
    except ValidationFailed:
        folder = WORK / recipe["name"]
    report = json.loads(max(folder.glob("*-validate-*/report.json"), key=lambda p: p.stat().st_mtime).read_text())
    export = json.loads(max(folder.glob("*-export-*/manifest.json"), key=lambda p: p.stat().st_mtime).read_text())
    m = report["metrics"]
    rows = [
        {
            "engine": "our runner (ONNX Runtime)",
            "perplexity": m["perplexity"],
            "vs_onnx_pct": 0.0,
            "top1_onnx": 1.0,
            "greedy_onnx": 1.0,
            "mib": export["metrics"]["onnx_bytes"] / 2**20,
        }
    ]
    for key, engine in ENGINES.items():
        if f"{key}_perplexity" not in m:
            continue
        size = export["metrics"].get(f"{key}_bytes") or (export["metrics"]["onnx_bytes"] if key == "genai" else None)
        rows.append(
            {
                "engine": engine,
                "perplexity": m[f"{key}_perplexity"],
                "vs_onnx_pct": m[f"{key}_perplexity_vs_onnx_pct"],
                "top1_onnx": m.get(f"{key}_onnx_top1_agreement"),
                "greedy_onnx": m[f"{key}_onnx_greedy_agreement"],
                "mib": size / 2**20 if size else None,
            }
        )
    return {
        "variant": name,
        "baseline_perplexity": m["perplexity_baseline"],
        "rows": rows,
        "failures": report["failures"],
        "seconds": round(time.time() - started, 1),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| variant | engine | perplexity | vs ONNX | next-token argmax = ONNX | greedy tokens = ONNX | MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["rows"]:
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            lines.append(
                f"| {r['variant']} | {row['engine']} | {row['perplexity']:.3f} | {row['vs_onnx_pct']:.3f} % | "
                f"{fmt(row['top1_onnx'], '.3f')} | {fmt(row['greedy_onnx'], '.3f')} | {fmt(row['mib'], '.1f')} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / "engines_compare.json"
    previous = json.loads(saved.read_text()) if saved.is_file() and args.only else {}
    kept = {r["variant"]: r for r in previous.get("results", []) if previous.get("windows") == args.windows}
    for name, recipe in variants().items():
        if args.only and name not in args.only:
            continue
        kept[name] = measure(name, recipe, args.windows)
        print(json.dumps(kept[name]), flush=True)
    results = [kept[name] for name in variants() if name in kept]  # --only re-measures some, keeps the rest
    text = table(results)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"windows": args.windows, "results": results}, indent=2))
    (RESULTS / "engines_compare.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
