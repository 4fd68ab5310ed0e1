"""GGUF through llama.cpp: our calibrated INT4 against llama.cpp's own quantizer on the same float model.

    .venv/bin/python -m benchmarks.experiments.gguf_compare [--windows 40] [--only NAME ...]

Ours: recipes run into artifacts/bench-gguf/<name>/ (quantize -> export with targets [onnx, gguf] ->
validate); the validate stage measures the GGUF through llama.cpp and the ONNX artifact through our
runner on the same windows. llama.cpp's own: an F32 GGUF of the float model (our writer, all tensors
float32) quantized by llama.cpp's `llama_model_quantize` (its defaults: a tied embedding/head gets a
higher-precision type), measured through llama.cpp on the same windows (WikiText-2 test, 512-token
windows, the first --windows). Needs llama-cpp-python (`make engines`). Prints a Markdown table and
writes artifacts/bench-gguf/gguf_compare.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

from calibration import load_text, windows
from pipeline import run
from pipeline.formats.gguf import GGUF_FILE, GGUF_FOLDER, write_gguf
from pipeline.stages.validate.targets import LlamaCppEngine, scored_window, target_perplexity
from runtime import find_model_folder
from runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "artifacts" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "artifacts" / "bench-gguf"

OURS = {
    "ours-gptq-asym-g32 (Q4_1)": {"method": "gptq", "group_size": 32},
    "ours-gptq-sym-g32 (Q4_0)": {"method": "gptq", "group_size": 32, "symmetric": True},
    "ours-rtn-sym-g32 (Q4_0)": {"method": "rtn", "group_size": 32, "symmetric": True},
    # float zero points re-find this model's own Q4_1 grid (a conversion check, not a quality result)
    "ours-rtn-asym-g32-float-zero (Q4_1)": {"method": "rtn", "group_size": 32, "zero_point": "float"},
}
LLAMA_CPP = {"llama.cpp Q4_0": 2, "llama.cpp Q4_1": 3}  # llama_ftype: MOSTLY_Q4_0, MOSTLY_Q4_1


def recipe_for(name: str, quantize: dict, windows_: int) -> Path:
    q = {
        "bits": 4,
        "lm_head": "int4",
        "embedding": "int4",
        "calibration": {"data": {"source": "wikitext-2", "split": "valid"}},
        **quantize,
    }
    recipe = {
        "name": slug(name),
        "model": {"source": str(GGUF)},
        "stages": [
            {"quantize": q},
            {"export": {"accuracy_level": 4, "targets": ["onnx", "gguf"]}},
            # a gate that cannot fail: this script reports the numbers, it does not judge them
            {"validate": {"max_windows": windows_, "thresholds": {"perplexity_delta_pct": 1000}}},
        ],
    }
    path = OUT / f"{slug(name)}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def slug(name: str) -> str:
    return name.split(" ")[0]


def llama_cpp_own(float_model: Path, ftype: int, name: str) -> Path:
    """llama.cpp's quantizer on an F32 GGUF of the float checkpoint."""
    import llama_cpp

    f32 = OUT / "float32.gguf"
    if not f32.exists():
        write_gguf(float_model, f32, GGUF)
    out = OUT / f"{slug(name).replace('.', '-')}-{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {name}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows, float_model, tokenizer_dir = [], None, None
    for name, quantize in OURS.items():
        if args.only and slug(name) not in args.only:
            continue
        started = time.time()
        folder = run(recipe_for(name, quantize, args.windows), workdir=OUT)
        report = json.loads(next(folder.glob("*-validate-*/report.json")).read_text())
        export = find_model_folder(folder)
        float_model, tokenizer_dir = next(folder.glob("00-model-*")), export
        m = report["metrics"]
        rows.append(
            {
                "variant": name,
                "gguf_perplexity": m.get("gguf_perplexity"),
                "onnx_perplexity": m["perplexity"],
                "gguf_vs_onnx_pct": m.get("gguf_perplexity_vs_onnx_pct"),
                "gguf_onnx_greedy_agreement": m.get("gguf_onnx_greedy_agreement"),
                "gguf_onnx_top1_agreement": m.get("gguf_onnx_top1_agreement"),
                "baseline_perplexity": m["perplexity_baseline"],
                "gguf_mb": (export / GGUF_FOLDER / GGUF_FILE).stat().st_size / 2**20,
                "seconds": round(time.time() - started, 1),
            }
        )
        print(rows[-1], flush=True)
    if float_model is not None:
        ids = np.array(Tokenizer(tokenizer_dir).encode(load_text("wikitext-2", "test"), add_special_tokens=False))
        wins = [scored_window(ids, w.begin, w.end, w.scored, None) for w in windows(len(ids), 512, 512, args.windows)]
        for name, ftype in LLAMA_CPP.items():
            path = llama_cpp_own(float_model, ftype, name)
            ppl, _ = target_perplexity(LlamaCppEngine(path, 512), wins)
            rows.append({"variant": name, "gguf_perplexity": ppl, "gguf_mb": path.stat().st_size / 2**20})
            print(rows[-1], flush=True)
    print(
        "\n| variant | llama.cpp ppl | our ONNX ppl | GGUF vs ONNX | top-1 = ONNX | greedy = ONNX | GGUF MiB |\n"
        "|---|---|---|---|---|---|---|"
    )
    for r in rows:
        onnx = f"{r['onnx_perplexity']:.3f}" if "onnx_perplexity" in r else "-"
        vs = f"{r['gguf_vs_onnx_pct']:.3f} %" if r.get("gguf_vs_onnx_pct") is not None else "-"
        agree = f"{r['gguf_onnx_greedy_agreement']:.3f}" if r.get("gguf_onnx_greedy_agreement") is not None else "-"
        top1 = f"{r['gguf_onnx_top1_agreement']:.3f}" if r.get("gguf_onnx_top1_agreement") is not None else "-"
        print(
            f"| {r['variant']} | {r['gguf_perplexity']:.3f} | {onnx} | {vs} | {top1} | {agree} | {r['gguf_mb']:.1f} |"
        )
    (OUT / "gguf_compare.json").write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
