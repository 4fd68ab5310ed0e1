"""How the tool holds against bad and hostile input: every test marked `hostile`, counted per class.

    .venv/bin/python -m benchmarks.checks.hostile

Runs `pytest -m hostile` (recipes, model sources, the workdir, damaged artifacts, distill resume and the
server's requests and shutdown), reads its JUnit report and counts, per class of input, the cases tried,
held (the input was refused or survived as the test demands: one line, a 4xx, exit 0 ...) and broke.
Prints a table; writes benchmarks/results/hostile/hostile.json with the machine, versions, commit and
command. Exit 1 if any case broke.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "hostile" / "hostile.json"

# (test path prefix, class): the first prefix that matches a case's file names its class
CLASSES = (
    ("tests/runtime/serve/", "server: malformed, oversized or unauthorized requests, disconnects, shutdown"),
    ("tests/runtime/", "artifacts: truncated, corrupted or tampered files"),
    ("tests/pipeline/test_recipe.py", "recipes: bad YAML, encodings, sizes, keys and values"),
    ("tests/pipeline/test_models.py", "model sources: unreachable hub, bad paths"),
    ("tests/pipeline/test_steps_cache.py", "workdir: concurrent runs and the cache"),
    ("tests/pipeline/distill/", "distill resume: killed runs and unsafe checkpoints"),
    ("tests/pipeline/stages/test_distill.py", "distill resume: killed runs and unsafe checkpoints"),
)


def case_class(file: str) -> str | None:
    for prefix, name in CLASSES:
        if file.startswith(prefix):
            return name
    return None


def run_cases() -> list[dict]:
    """Each hostile case: its file, name and outcome (held, broke or skipped)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "hostile",
                "-p",
                "no:cacheprovider",
                "-o",
                "junit_family=xunit1",
                f"--junitxml={report}",
            ],
            cwd=ROOT,
        )
        if not report.exists():
            raise SystemExit("error: pytest wrote no report; run `pytest -m hostile` to see why")
        cases = []
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = "held"
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "broke"
            elif case.find("skipped") is not None:
                outcome = "skipped"
            cases.append({"file": case.get("file", ""), "name": case.get("name", ""), "outcome": outcome})
    return cases


def main() -> int:
    from pipeline.bench.system import envelope

    env = envelope("python -m benchmarks.checks.hostile", ("pipeline", "runtime", "tests"))
    cases = run_cases()
    classes: dict[str, dict] = {
        name: {"tried": 0, "held": 0, "broke": 0, "skipped": 0, "files": []} for _, name in CLASSES
    }
    for case in cases:
        name = case_class(case["file"])
        if name is None and case["outcome"] == "skipped":
            continue  # a whole module skipped at collection (its engines missing), not a hostile case
        if name is None:
            raise SystemExit(f"error: {case['file']}: a hostile test outside the known classes; add it to CLASSES")
        row = classes[name]
        row["tried"] += 1
        row[case["outcome"]] += 1
        if case["file"] not in row["files"]:
            row["files"].append(case["file"])
    classes = {name: row for name, row in classes.items() if row["tried"]}
    print(f"{'class':<80} {'tried':>6} {'held':>6} {'broke':>6}")
    for name, row in classes.items():
        print(f"{name:<80} {row['tried']:>6} {row['held']:>6} {row['broke']:>6}")
    total = {key: sum(row[key] for row in classes.values()) for key in ("tried", "held", "broke", "skipped")}
    print(f"{'all':<80} {total['tried']:>6} {total['held']:>6} {total['broke']:>6}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({**env, "classes": classes, "total": total, "cases": cases}, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 1 if total["broke"] else 0


if __name__ == "__main__":
    sys.exit(main())
