"""`optimize plan RECIPE`: what a run would do before it does it. The recipe with every default filled in,
each step's state in the workdir (cached, linked from another run, or to build), its estimated peak
memory against this machine's and its estimated time; nothing is built or written but the workdir's checksum cache."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import click
import yaml

from pipeline.artifacts import ChecksumCache
from pipeline.estimate import estimate, memory_bytes, model_shape
from pipeline.estimate_time import describe, estimate_seconds
from pipeline.recipe import Recipe
from pipeline.steps import fingerprints, states


def resolved(recipe: Recipe) -> str:
    """The recipe as it will run, as YAML: every key with its value, defaults included."""

    def plain(config) -> dict:
        return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != "version"}))

    data = {
        "name": recipe.name,
        "model": plain(recipe.model),
        "stages": [{entry.name: plain(entry.config)} for entry in recipe.stages],
    }
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def step_states(recipe: Recipe, workdir: Path) -> list[tuple[str, str, str]]:
    """(step folder, stage, state) for the model step and each stage, as `optimize RECIPE` would find them.
    Source hashes are taken from, and added to, the workdir's checksum cache, as a run does."""
    checksums = ChecksumCache(workdir / ".checksums.json" if workdir.is_dir() else None)
    return states(recipe, workdir / recipe.name, fingerprints(recipe, checksums))


def plan_text(recipe: Recipe, workdir: Path) -> str:
    lines = [f"# {recipe.path} as it will run (every default filled in)", resolved(recipe).rstrip(), ""]
    try:
        shape = model_shape(recipe.source.kind, recipe.source.location, recipe.model.dtype)
    except (OSError, ValueError, KeyError, IndexError, struct.error):
        shape = None
    peaks, seconds = {}, {}
    if shape is not None:
        stages = [(e.name, e.config) for e in recipe.stages]
        peaks = dict(enumerate(e.peak_bytes for e in estimate(shape, stages)))
        seconds = dict(enumerate(estimate_seconds(shape, stages, recipe.source.kind)))
    total, available = memory_bytes()
    lines.append(f"# steps in {workdir / recipe.name}")
    lines.append(f"{'step':<28} {'state':<32} {'est. peak RSS':>14} {'est. time':>10}")
    for index, (step, _, state) in enumerate(step_states(recipe, workdir)):
        peak = f"{peaks[index] / 2**30:.1f} GiB" if index in peaks else "?"
        took = describe(seconds.get(index)) if state == "build" else "-"
        lines.append(f"{step:<28} {state:<32} {peak:>14} {took:>10}")
    if shape is None:
        lines.append("(no estimate: the model's shape is read once it is downloaded)")
    else:
        lines.append("(times at this machine's measured matmul speed)")
    if total:
        lines.append(f"this machine: {total / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")
    return "\n".join(lines)


@click.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=str))
@click.option("--workdir", default="artifacts", show_default=True, help="where run folders are written")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="change one recipe setting, as `optimize RECIPE --set` would (repeatable)",
)
@click.option("--model", "model_source", default=None, metavar="SOURCE", help="plan the recipe on this model")
def plan_command(recipe, workdir, overrides, model_source):
    """Print what `optimize RECIPE` would do: the resolved recipe, each step cached or to build, memory."""
    import sys

    from pipeline.errors import PipelineError
    from pipeline.recipe import load_recipe
    from pipeline.recipe_overrides import model_overrides

    if model_source is not None:
        overrides = (*model_overrides(model_source, recipe), *overrides)
    try:
        click.echo(plan_text(load_recipe(recipe, overrides), Path(workdir)))
    except PipelineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
