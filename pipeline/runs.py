"""`optimize runs` and `optimize show RUN`: what a workdir holds and how each run went, without opening folders.

Everything is read from the files a run leaves: `run.json` (the steps and the status) and each step's
`manifest.json` (the model source, the sizes, validate's metrics). A folder that is not a run is skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from runtime.errors import RuntimeFailure
from runtime.integrity import inside

HEADLINE = ("perplexity_delta_pct", "top1_agreement", "kl_divergence")


def read_run(run_dir: Path) -> dict | None:
    """run.json with each step's manifest beside it (None when the folder holds no readable run.json)."""
    try:
        record = json.loads((run_dir / "run.json").read_text())
        steps = record["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for step in steps:
        try:
            folder = inside(run_dir, str(step["dir"]), "run.json")
            step["manifest"] = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError, KeyError, TypeError, RuntimeFailure):  # a damaged step reads as absent
            step["manifest"] = {}
    return record


def summary(run_dir: Path, record: dict) -> dict:
    """One row of `optimize runs`: name, model, steps, status, exported size, headline metrics, when."""
    manifests = {s.get("stage"): s["manifest"] for s in record["steps"]}
    source = str(manifests.get("model", {}).get("config", {}).get("source", "?"))
    export = manifests.get("export", {})
    files = export.get("files", {})
    graph = "fused/" if any(name.startswith("fused/") for name in files) else ""  # the graph the runner loads
    size = (
        sum(
            f.get("bytes", 0)
            for name, f in files.items()
            if name.startswith(graph) and "/" not in name[len(graph) :] and "model.onnx" in name
        )
        or None
    )
    metrics = manifests.get("validate", {}).get("metrics", {})
    return {
        "name": run_dir.name,
        "model": Path(source).name if source.endswith(".gguf") else source,
        "steps": " → ".join(s.get("stage", "?") for s in record["steps"]),
        "status": record.get("status", "?"),
        "size_mb": round(size / 1e6, 1) if size else None,
        "metrics": {k: metrics[k] for k in HEADLINE if k in metrics},
        "when": record.get("finished") or record.get("started"),
    }


def list_runs(workdir: Path) -> list[dict]:
    """Every run in `workdir`, newest first."""
    rows = []
    for run_dir in sorted(p for p in Path(workdir).iterdir() if p.is_dir()) if Path(workdir).is_dir() else []:
        record = read_run(run_dir)
        if record is not None:
            rows.append(summary(run_dir, record))
    return sorted(rows, key=lambda r: r["when"] or 0, reverse=True)


def _fmt_metrics(metrics: dict) -> str:
    names = {"perplexity_delta_pct": "ppl {:+.2f} %", "top1_agreement": "top-1 {:.3f}", "kl_divergence": "KL {:.4f}"}
    return ", ".join(names[k].format(v) for k, v in metrics.items() if isinstance(v, (int, float))) or "-"


@click.command("runs")
@click.option("--workdir", default="artifacts", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def runs_command(workdir: Path):
    """List the runs in WORKDIR: model, steps, status, exported size, headline metrics, when."""
    rows = list_runs(workdir)
    if not rows:
        click.echo(f"no runs in {workdir} (run one: optimize recipes/smollm2-fp32.yaml)")
        return
    header = ("run", "model", "steps", "status", "graph MB", "accuracy vs. float", "when")
    table = [header] + [
        (
            r["name"],
            str(r["model"]),
            r["steps"],
            r["status"],
            "-" if r["size_mb"] is None else str(r["size_mb"]),
            _fmt_metrics(r["metrics"]),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["when"])) if r["when"] else "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@click.command("show")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--workdir", default="artifacts", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def show_command(run: Path, workdir: Path):
    """Show RUN (a run folder, or a run's name in WORKDIR): its steps, validate's summary and how to use it."""
    run_dir = run if (run / "run.json").is_file() else workdir / run
    record = read_run(run_dir)
    if record is None:
        raise click.ClickException(
            f"{run}: no run here (no readable run.json in {run_dir}); `optimize runs` lists them"
        )
    row = summary(run_dir, record)
    click.echo(
        f"run {row['name']}: {record.get('recipe', '?')}{''.join(f' --set {o}' for o in record.get('overrides', []))}"
    )
    click.echo(f"status: {row['status']}" + (f" ({record['error']})" if record.get("error") else ""))
    for step in record["steps"]:
        how = "cached" if step.get("cached") else f"built in {step.get('seconds', 0):.0f} s"
        click.echo(f"  {step.get('stage', '?'):<9} {run_dir / str(step.get('dir', '?'))}  ({how})")
    validate = next((s for s in reversed(record["steps"]) if s.get("stage") == "validate"), None)
    if validate is not None:
        report = run_dir / str(validate["dir"]) / "report.md"
        if report.is_file():
            click.echo("")
            click.echo(_report_summary(report.read_text()))
    if any(s.get("stage") == "export" for s in record["steps"]):
        click.echo(f'\ngenerate: optimize generate {run_dir} "What is the capital of France?"')
        click.echo(f"serve:    optimize serve {run_dir} --port 8000")
        click.echo(f"bench:    optimize bench {run_dir}")


def _report_summary(text: str) -> str:
    """validate's report.md up to its first section after the metrics table (the samples follow)."""
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if i > 0 and line.startswith("## ")), len(lines))
    return "\n".join(lines[:end]).rstrip()
