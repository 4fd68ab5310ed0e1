"""Accuracy beyond the calibration text: each shipped recipe's artifact against the float model on three kinds of text.

    .venv/bin/python -m benchmarks.checks.domains [--recipes smollm2-fp32,smollm2-int4-rtn,smollm2-int4-gptq] [--windows 40]

Runs each recipe as a user would (its steps cached in --workdir like any run), with validate scoring
WikiText-2 test (prose, the calibration text's domain), Tiny Shakespeare's last 4,000 lines (plays) and
Python standard-library code (code), ungated, chat checks off. Prints the perplexity change, KL and
top-1 agreement per text and writes benchmarks/results/domains/domains.json with the machine, versions,
commit and command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "domains" / "domains.json"
DOMAINS = (
    "{prose: {source: wikitext-2, split: test}, plays: {source: tinyshakespeare, split: test}, "
    "code: {source: python-code, split: test}}"
)


def run_recipe(name: str, workdir: Path, windows: int) -> dict:
    """One recipe end to end; returns the validate step's per-text figures."""
    settings = [
        f"validate.eval_data={DOMAINS}",
        "validate.thresholds={}",
        "validate.default_gates=false",
        "validate.chat=null",
        f"validate.max_windows={windows}",
    ]
    command = [sys.executable, "-m", "pipeline", str(ROOT / "recipes" / f"{name}.yaml"), "--workdir", str(workdir)]
    for s in settings:
        command += ["--set", s]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    from pipeline.runs import read_run, summary

    run = read_run(workdir / name)
    manifests = {s["stage"]: s["manifest"] for s in run["steps"]}
    manifest = manifests["validate"]
    quantize = manifests.get("quantize", {}).get("config", {})
    metrics, protocol = manifest["metrics"], manifest["protocol"]
    texts = {}
    for domain, proto in protocol["domains"].items():
        texts[domain] = {
            "source": f"{proto['dataset']} / {proto['split']}",
            "windows": proto["windows"],
            "perplexity_baseline": round(proto["perplexity_baseline"], 4),
            "perplexity": round(proto["perplexity"], 4),
            "perplexity_delta_pct": round(metrics[f"perplexity_delta_pct@{domain}"], 3),
            "kl_divergence": round(metrics[f"kl_divergence@{domain}"], 5),
            "top1_agreement": round(metrics[f"top1_agreement@{domain}"], 4),
        }
    return {
        "recipe": f"recipes/{name}.yaml",
        "settings": settings,
        "method": f"{quantize['method']} {quantize['bits'] if quantize['method'] != 'w8a8' else 8}-bit"
        if quantize
        else "float32",
        "weights_mb": summary(workdir / name, run)["size_mb"],
        # each step's own build time, from its manifest (also when this run found it cached)
        "build_seconds": round(sum(m["timing"]["seconds"] for stage, m in manifests.items() if stage != "validate"), 1),
        "seconds": round(time.time() - started, 1),
        "texts": texts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="smollm2-fp32,smollm2-int4-rtn,smollm2-int4-gptq")
    parser.add_argument("--windows", type=int, default=40, help="windows of 512 tokens per text")
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts")
    args = parser.parse_args()
    from pipeline.bench.system import envelope as take_envelope

    envelope = take_envelope(" ".join(["python -m benchmarks.checks.domains", *sys.argv[1:]]))
    rows = [run_recipe(name, args.workdir, args.windows) for name in args.recipes.split(",")]
    print(f"{'recipe':<24} {'text':<7} {'ppl float':>10} {'ppl':>10} {'Δ %':>8} {'KL':>9} {'top-1':>7}")
    for row in rows:
        for domain, t in row["texts"].items():
            print(
                f"{Path(row['recipe']).stem:<24} {domain:<7} {t['perplexity_baseline']:>10.3f} {t['perplexity']:>10.3f} "
                f"{t['perplexity_delta_pct']:>+8.2f} {t['kl_divergence']:>9.4f} {t['top1_agreement']:>7.3f}"
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({**envelope, "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
