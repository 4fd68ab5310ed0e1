"""The scale ladder: real-shape checkpoints with random weights through the shipped recipes, stage by stage.

    python -m benchmarks.checks.scale --rungs qwen2.5-0.5b --recipes fp32,int4-rtn --merge --drop-runs   (make scale-check)
    python -m benchmarks.checks.scale --rungs smollm2-1.7b,llama-3.2-3b,llama-3-8b --recipes int4-rtn,int4-gptq

Each rung is a config in benchmarks/checks/scale_configs/ (the shape of a real model, the reference
tokenizer's vocabulary so its tokenizer fits). Its checkpoint is built here in bfloat16, one tensor at
a time straight into safetensors shards, so building an 8B one never holds the model. Random weights
are right for memory and time and say nothing about accuracy, so validate runs without gates on 2
windows. Every recipe runs as a user runs it (`python -m pipeline RECIPE --set model.source=…`) in a
process of its own; the per-step wall time and peak RSS come from the steps' manifests (the step loop
records them, pipeline/resources.py). Prints a table and writes scale.json with the machine,
versions, commit and command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "scale_configs"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
SHARD_BYTES = 2 * 10**9
RECIPES = {  # name -> (shipped recipe, settings that make it about memory and time, not accuracy)
    "fp32": ("recipes/smollm2-fp32.yaml", []),
    "int4-rtn": ("recipes/smollm2-int4-rtn.yaml", ["validate.chat=null"]),
    "int4-gptq": (
        "recipes/smollm2-int4-gptq.yaml",
        ["validate.chat=null", "quantize.budget=null", "quantize.calibration.num_samples=32"],
    ),
}
COMMON = [
    "validate.max_windows=2",
    "validate.thresholds={}",
    "validate.default_gates=false",
    "validate.max_new_tokens=8",
]


def build_checkpoint(config_file: Path, tokenizer: Path, out: Path, seed: int = 0) -> Path:
    """A bfloat16 checkpoint of the config's shape with random weights (std 0.02, norms 1), written
    tensor by tensor into shards of about 2 GB; the model is only ever built on the meta device."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "model.safetensors.index.json").is_file():
        return out
    from pipeline.resources import release_memory

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = json.loads(config_file.read_text())
    config = AutoConfig.for_model(**spec)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    weight_map, shard, shard_bytes, shards = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    index = {"metadata": {"total_size": sum((tmp / s).stat().st_size for s in shards)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, tmp / name)
    tmp.rename(out)
    del shard, skeleton
    release_memory()  # this process waits beside the runs: it should not hold what building took
    return out


def find_tokenizer() -> Path:
    """The reference tokenizer: a SmolLM2 model step of an earlier run (`make quickstart` makes one)."""
    for step in sorted(ROOT.glob("artifacts/*/00-model-*")):
        if (step / "tokenizer.json").is_file() and json.loads((step / "config.json").read_text()).get(
            "vocab_size"
        ) == 49152:
            return step
    sys.exit(
        "no SmolLM2 model step under artifacts/ to take the tokenizer from: run `make quickstart` first, "
        "or pass --tokenizer DIR"
    )


def run_recipe(recipe: str, source: Path, name: str, workdir: Path, extra: list[str], timeout: int) -> dict:
    """One recipe end to end in its own process; per step: seconds, peak RSS, size; what failed, if anything."""
    settings = [f"model.source={source}", f"name={name}", *COMMON, *extra]
    command = [sys.executable, "-m", "pipeline", str(ROOT / recipe), "--workdir", str(workdir), "--force"]
    for s in settings:
        command += ["--set", s]
    started = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = done.returncode, (done.stdout + done.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", [f"over {timeout} s"]
    row: dict = {
        "recipe": recipe,
        "settings": settings,
        "returncode": rc,
        "wall_seconds": round(time.time() - started, 1),
        "steps": [],
    }
    if rc != 0:
        row["error"] = tail
    for step in sorted((workdir / name).glob("[0-9][0-9]-*")):
        manifest = json.loads((step / "manifest.json").read_text())
        row["steps"].append(
            {
                "step": step.name.rsplit("-", 1)[0],
                "seconds": manifest["timing"]["seconds"],
                **manifest.get("resources", {}),
                "bytes": sum(f["bytes"] for f in manifest["files"].values()),
                **{k: v for k, v in manifest.get("metrics", {}).items() if k == "seconds_per_layer"},
            }
        )
    run_json = workdir / name / "run.json"
    planned = json.loads(run_json.read_text()).get("estimates", []) if run_json.is_file() else []
    predicted = {e["step"]: e for e in planned}  # what the run's plan line said before it started
    for step in row["steps"]:
        estimate = predicted.get(step["step"].split("-", 1)[1], {})
        step["estimated_peak_rss_mb"] = estimate.get("peak_rss_mb", 0)
        step["estimated_seconds"] = estimate.get("seconds")
    export = next(iter(sorted((workdir / name).glob("[0-9][0-9]-export-*"))), None)
    if export is not None and rc == 0:
        row["decode"] = decode_speed(export)
    return row


def decode_speed(export: Path, prompt_tokens: int = 128, new_tokens: int = 32) -> dict:
    """The artifact's decode tokens/s at batch 1 through our runner (greedy, a random-token prompt)."""
    code = (
        "import json, sys, numpy as np\nfrom runtime import Generator\n"
        f"g = Generator({str(export)!r})\n"
        f"ids = np.random.default_rng(0).integers(100, 40000, {prompt_tokens}).tolist()\n"
        f"g.generate([ids], max_new_tokens=4, ignore_eos=True)\n"
        f"r = g.generate([ids], max_new_tokens={new_tokens}, ignore_eos=True)\n"
        "print(json.dumps({'provider': g.provider, 'graph': g.flavour, 'tokens_per_second': round(r.decode_tokens_per_second, 2)}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def envelope() -> dict:
    from pipeline.bench.system import envelope as take_envelope
    from pipeline.estimate import memory_bytes

    return {
        **take_envelope(
            " ".join(["python -m benchmarks.checks.scale", *sys.argv[1:]]), ("pipeline", "runtime", "calibration")
        ),
        "memory_gib": round(memory_bytes()[0] / 2**30, 1),
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'rung':<14} {'recipe':<10} {'step':<12} {'seconds':>8} {'est.':>7} {'peak RSS GiB':>13} {'estimated':>10} {'size GB':>8}  outcome"
    )
    for r in rows:
        outcome = (
            "ok" if r["returncode"] == 0 else f"FAILED ({r['returncode']}): {' / '.join(r.get('error', []))[:120]}"
        )
        for s in r["steps"]:
            print(
                f"{r['rung']:<14} {r['name']:<10} {s['step']:<12} {s['seconds']:>8.1f} {_seconds(s):>7} "
                f"{s.get('peak_rss_mb', 0) / 1024:>13.2f} {s.get('estimated_peak_rss_mb', 0) / 1024:>10.2f} {s['bytes'] / 1e9:>8.2f}"
            )
        decode = r.get("decode", {})
        speed = (
            f", decode {decode['tokens_per_second']} tok/s ({decode['provider']})"
            if "tokens_per_second" in decode
            else ""
        )
        print(
            f"{r['rung']:<14} {r['name']:<10} {'total':<12} {r['wall_seconds']:>8.1f} {'':>7} {'':>13} {'':>10} {'':>8}  {outcome}{speed}"
        )


def _seconds(step: dict) -> str:
    return "?" if step.get("estimated_seconds") is None else f"{step['estimated_seconds']:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rungs",
        default="qwen2.5-0.5b",
        help=f"comma-separated, of: {', '.join(p.stem for p in sorted(CONFIGS.glob('*.json')))}",
    )
    parser.add_argument("--recipes", default="fp32,int4-rtn", help=f"comma-separated, of: {', '.join(RECIPES)}")
    parser.add_argument(
        "--tokenizer", type=Path, help="folder with the reference tokenizer (default: a SmolLM2 model step)"
    )
    parser.add_argument(
        "--models", type=Path, default=ROOT / "artifacts" / "scale-models", help="where checkpoints are built"
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "scale")
    parser.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per recipe run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale" / "scale.json")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep --out's rows of other rungs and recipes (each row names the commit and command that measured it)",
    )
    parser.add_argument(
        "--drop-runs",
        action="store_true",
        help="delete each run's folder once measured (disk: an 8B run writes about 60 GB)",
    )
    args = parser.parse_args()
    tokenizer = args.tokenizer or find_tokenizer()
    rows = []
    for rung in args.rungs.split(","):
        config = CONFIGS / f"{rung}.json"
        if not config.is_file():
            sys.exit(f"--rungs: no config {config.name} in {CONFIGS}")
        started = time.time()
        source = build_checkpoint(config, tokenizer, args.models / rung)
        print(
            f"{rung}: checkpoint {source} ({sum(f.stat().st_size for f in source.glob('*.safetensors')) / 1e9:.2f} GB bf16, "
            f"{time.time() - started:.0f} s)",
            flush=True,
        )
        for name in args.recipes.split(","):
            if name not in RECIPES:
                sys.exit(f"--recipes: '{name}' is not one of {', '.join(RECIPES)}")
            recipe, extra = RECIPES[name]
            run_envelope = envelope()  # the code as the run starts: edits made while it runs are not its
            row = {
                "rung": rung,
                "name": name,
                **run_recipe(recipe, source, f"{rung}-{name}", args.workdir, extra, args.timeout),
            }
            row["checkpoint_gb"] = round(sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e9, 3)
            row.update({k: run_envelope[k] for k in ("commit", "command", "date", "machine", "versions", "memory_gib")})
            rows.append(row)
            if args.drop_runs:
                shutil.rmtree(args.workdir / f"{rung}-{name}", ignore_errors=True)
            print_table([row])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and args.out.is_file():
        new = {(r["rung"], r["name"]) for r in rows}
        earlier = json.loads(args.out.read_text())
        kept = [r for r in earlier["rows"] if (r["rung"], r["name"]) not in new]
        for r in kept:  # rows from before rows named their machine: the file's envelope was theirs
            r.update({k: earlier[k] for k in ("machine", "versions", "memory_gib") if k not in r and k in earlier})
        rows = kept + rows
    args.out.write_text(json.dumps({**envelope(), "rows": rows}, indent=2) + "\n")
    print()
    print_table(rows)
    print(f"wrote {args.out}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
