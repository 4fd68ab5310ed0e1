"""What each install weighs on disk: a fresh virtual environment per install line of the README.

    .venv/bin/python -m benchmarks.checks.installs

Builds, in a temporary folder, one virtual environment for the CPU pipeline (`.[pipeline,cpu]`) and one
for the runtime-only install (`.[cpu]`) with pip from this clone, then measures each folder's size, the
largest packages, and whether torch is in it. Prints a table; writes benchmarks/results/installs/installs.json
with the machine, versions, commit and command. The torch wheel is whichever pip picks on this machine
(the CPU build here; the default Linux wheel from PyPI brings CUDA libraries and weighs several times more).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "installs" / "installs.json"
# name: (extras, what is installed first); the CPU build of torch as the README suggests for a machine without
# a GPU (the one this machine holds on disk: PyTorch's CPU index is out of reach here)
INSTALLS = {
    "pipeline, CPU": ("pipeline,cpu", None),
    "pipeline, CPU, torch's CPU build first": ("pipeline,cpu", "torch==2.13.0+cpu"),
    "runtime only, CPU": ("cpu", None),
}
SIZES = """
import json, sys
from importlib import metadata
sizes, versions = {}, {}
for dist in metadata.distributions():
    total = sum(f.locate().stat().st_size for f in dist.files or [] if f.locate().is_file())
    sizes[dist.metadata["Name"].lower()] = total
    versions[dist.metadata["Name"].lower()] = dist.version
print(json.dumps({"sizes": sizes, "versions": versions}))
"""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def measure(extras: str, first: str | None, folder: Path) -> dict:
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    started = time.perf_counter()
    if first:
        subprocess.run([*pip, first], check=True)
    subprocess.run([*pip, f"{ROOT}[{extras}]"], check=True)
    seconds = time.perf_counter() - started
    found = json.loads(subprocess.run([str(python), "-c", SIZES], capture_output=True, text=True, check=True).stdout)
    sizes = found["sizes"]
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    return {
        "extras": extras,
        "installed_first": first,
        "torch": found["versions"].get("torch"),
        "transformers": found["versions"].get("transformers"),
        "bytes": folder_bytes(folder),
        "packages": len(sizes),
        "has_torch": "torch" in sizes,
        "has_transformers": "transformers" in sizes,
        "largest_mb": {name: round(size / 2**20, 1) for name, size in largest},
        "install_seconds_cached": round(seconds, 1),
    }


def main() -> int:
    from pipeline.bench.system import envelope

    env = envelope("python -m benchmarks.checks.installs", ("pyproject.toml", "pipeline", "runtime"))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (extras, first)) in enumerate(INSTALLS.items()):
            rows[name] = measure(extras, first, Path(tmp) / f"{i}-{extras.replace(',', '-')}")
            print(f"{name}: {rows[name]['bytes'] / 2**20:,.0f} MiB", flush=True)
    full, runtime = rows["pipeline, CPU, torch's CPU build first"]["bytes"], rows["runtime only, CPU"]["bytes"]
    print(f"{'install':<20} {'MiB':>8} {'packages':>9} {'torch':>6}  largest")
    for name, r in rows.items():
        largest = ", ".join(f"{k} {v:,.0f}" for k, v in list(r["largest_mb"].items())[:3])
        print(f"{name:<20} {r['bytes'] / 2**20:>8,.0f} {r['packages']:>9} {r['has_torch']!s:>6}  {largest}")
    print(f"runtime only / pipeline with torch's CPU build: {runtime / full:.2f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({**env, "installs": rows, "runtime_fraction": round(runtime / full, 3)}, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
