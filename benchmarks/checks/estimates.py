"""The plan's estimates against what the run then measures: each step's peak RSS and time.

    python -m benchmarks.checks.estimates                       (the reference's GPTQ recipe: about 17 minutes here)
    python -m benchmarks.checks.estimates --recipes recipes/smollm2-fp32.yaml,recipes/smollm2-int4-rtn.yaml

Each recipe runs as a user runs it (`python -m pipeline RECIPE --force`, nothing cached) in a fresh
workdir. The run's `plan:` line is what the estimate said before any work (run.json keeps it,
pipeline/steps.py); each step's manifest has what it measured (wall seconds, peak RSS of the step).
The targets: the quantize step's peak RSS within 25 % and its time within 50 %. Prints a table and
writes estimates.json with the machine, versions, commit and command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"quantize": {"peak_rss": 0.25, "seconds": 0.5}}  # step -> largest relative error allowed


def run_and_compare(recipe: str, workdir: Path, settings: list[str]) -> dict:
    command = [sys.executable, "-m", "pipeline", recipe, "--workdir", str(workdir), "--force"]
    for s in settings:
        command += ["--set", s]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    row: dict = {
        "recipe": recipe,
        "settings": settings,
        "returncode": done.returncode,
        "wall_seconds": round(time.time() - started, 1),
    }
    if done.returncode != 0:
        row["error"] = (done.stdout + done.stderr).strip().splitlines()[-3:]
    run_dir = next((p.parent for p in workdir.glob("*/run.json")), None)
    if run_dir is None:
        return {**row, "steps": []}
    plan = {e["step"]: e for e in json.loads((run_dir / "run.json").read_text()).get("estimates", [])}
    steps = []
    for folder in sorted(run_dir.glob("[0-9][0-9]-*")):
        manifest = json.loads((folder / "manifest.json").read_text())
        stage = folder.name.split("-")[1]
        estimate = plan.get(stage, {})
        measured_s, measured_mb = manifest["timing"]["seconds"], manifest.get("resources", {}).get("peak_rss_mb")
        step = {
            "step": stage,
            "seconds": measured_s,
            "estimated_seconds": estimate.get("seconds"),
            "peak_rss_mb": measured_mb,
            "estimated_peak_rss_mb": estimate.get("peak_rss_mb"),
        }
        step["seconds_error"] = _error(step["estimated_seconds"], measured_s)
        step["peak_rss_error"] = _error(step["estimated_peak_rss_mb"], measured_mb)
        limits = TARGETS.get(stage)
        if limits is not None:
            step["within_target"] = (
                step["peak_rss_error"] is not None
                and abs(step["peak_rss_error"]) <= limits["peak_rss"]
                and step["seconds_error"] is not None
                and abs(step["seconds_error"]) <= limits["seconds"]
            )
        steps.append(step)
    return {**row, "steps": steps}


def _error(estimate: float | None, measured: float | None) -> float | None:
    """(estimate - measured) / measured: +0.2 is an estimate 20 % high."""
    if estimate is None or not measured:
        return None
    return round((estimate - measured) / measured, 3)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'recipe':<34} {'step':<9} {'seconds':>8} {'est.':>8} {'error':>7} {'peak RSS MiB':>13} {'est.':>8} "
        f"{'error':>7}  target"
    )
    for r in rows:
        for s in r["steps"]:
            target = {True: "met", False: "MISSED", None: ""}[s.get("within_target")]
            print(
                f"{Path(r['recipe']).name:<34} {s['step']:<9} {s['seconds']:>8.1f} {_cell(s['estimated_seconds'])} "
                f"{_pct(s['seconds_error'])} {s['peak_rss_mb'] or 0:>13.0f} {_cell(s['estimated_peak_rss_mb'])} "
                f"{_pct(s['peak_rss_error'])}  {target}"
            )
        if r["returncode"] != 0:
            print(f"{Path(r['recipe']).name:<34} FAILED ({r['returncode']}): {' / '.join(r.get('error', []))[:120]}")


def _cell(value: float | None) -> str:
    return f"{value:>8.0f}" if value is not None else f"{'?':>8}"


def _pct(value: float | None) -> str:
    return f"{value * 100:>+6.0f}%" if value is not None else f"{'?':>7}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="recipes/smollm2-int4-gptq.yaml", help="comma-separated recipe files")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="KEY.PATH=VALUE for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "estimates" / "estimates.json")
    args = parser.parse_args()
    from pipeline.bench.system import envelope

    meta = envelope(" ".join(["python -m benchmarks.checks.estimates", *sys.argv[1:]]), ("pipeline",))
    rows = []
    for recipe in args.recipes.split(","):
        workdir = Path(tempfile.mkdtemp(prefix="estimates-"))
        try:
            rows.append(run_and_compare(recipe, workdir, args.settings))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print_table(rows[-1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "targets": TARGETS, "rows": rows}, indent=2) + "\n")
    print()
    print_table(rows)
    print(f"wrote {args.out}")
    met = [s["within_target"] for r in rows for s in r["steps"] if "within_target" in s]
    return 0 if all(r["returncode"] == 0 for r in rows) and all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
