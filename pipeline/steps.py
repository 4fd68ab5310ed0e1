"""Runs a recipe: each step is fingerprinted, reused when its artifact is intact, else rebuilt.

    model source ──► 00-model ──► 01-export ──► 02-validate
                     (HF ckpt)    (ONNX+KV)     (report)

    fingerprint(step) = sha256(parent fingerprint, stage name, stage version, resolved config)

A step is built in a hidden temp folder and renamed into place only after its manifest is
written, so a run killed at any moment leaves nothing that looks complete.

Under `torchrun` / `accelerate launch` every process runs this loop (pipeline/distributed.py): stages
registered as distributed are built by all of them together, every other step by process 0 alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import distributed, resources
from pipeline import stages as _stages  # noqa: F401  (registers the stages)
from pipeline.archs import export_spec
from pipeline.artifacts import (
    MANIFEST,
    SCHEMA_VERSION,
    Artifact,
    ChecksumCache,
    file_table,
    fingerprint,
    library_versions,
    load_verified,
    write_json_atomic,
)
from pipeline.errors import PipelineError, StageError, ValidationFailed
from pipeline.estimate import estimate, memory_bytes, model_shape
from pipeline.estimate_time import describe, estimate_seconds
from pipeline.formats.gguf import gguf_family
from pipeline.models import import_model, source_identity
from pipeline.recipe import data_identity, load_recipe
from pipeline.registry import STAGES, StageResult

MARGIN = 1.25  # refuse only what is clearly beyond the machine: the estimates are within about 15 %
LOCK_FILE = ".lock"  # held by the run working in the folder (see _run_lock)


@dataclass(frozen=True)
class RunContext:
    run_dir: Path
    out_dir: Path  # where the stage writes its files (a temp folder until the step completes)
    baseline: Artifact  # the imported, unoptimized model: the reference for accuracy
    history: tuple[Artifact, ...]  # every artifact before this step, in order (history[-1] is the input)
    log: Callable[[str], None]
    step: str = ""  # the step's folder name ("01-distill-<fingerprint>"): names state kept across runs
    fresh: bool = False  # --force: recompute what stages keep between runs too (validate's baseline answers)


def log(msg: str) -> None:
    if distributed.is_main():
        print(msg, flush=True)


@dataclass(frozen=True)
class CachePolicy:
    force: bool = False  # rebuild every step
    # hash every file of every reused artifact and source, not only those whose size or time changed
    verify: bool = False


def run(
    recipe_path: Path | str,
    workdir: Path | str = "artifacts",
    force: bool = False,
    overrides: Sequence[str] = (),
    verify: bool = False,
) -> Path:
    """Run a recipe end to end and return its run folder.

    Example:
        >>> from pipeline import run
        >>> run("recipes/smollm2-fp32.yaml")          # doctest: +SKIP
        PosixPath('artifacts/smollm2-fp32')
    """
    recipe = load_recipe(recipe_path, overrides)
    distributed.start()
    main, world = distributed.is_main(), distributed.world_size()
    run_dir = Path(workdir) / recipe.name
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _run_lock(run_dir, main):
            return _run(recipe, run_dir, Path(workdir), force, overrides, verify, main, world)
    finally:
        distributed.finish()


@contextlib.contextmanager
def _run_lock(run_dir: Path, main: bool) -> Iterator[None]:
    """One run per run folder at a time: an advisory lock on `run_dir/.lock`, released when the run ends or its
    process dies (kill -9 included), so a second run of the recipe refuses instead of taking the first one's
    temporary folder for an interrupted run's."""
    if not main:
        yield
        return
    with open(run_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StageError(
                f"{run_dir}: another run of this recipe is in progress ({holder}); wait for it to finish, "
                "or give this one another name (--set name=...) or --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(
    recipe, run_dir: Path, workdir: Path, force: bool, overrides: Sequence[str], verify: bool, main: bool, world: int
) -> Path:
    if main:
        _remove_stale_temps(run_dir)
    log(f"run {recipe.name}: {recipe.path}{''.join(f' --set {o}' for o in overrides)} -> {run_dir}")
    estimates = _check_memory(recipe) if main else []
    # processes 1.. follow the recipe up to its last distributed stage, then leave it to process 0
    shared = [i for i, entry in enumerate(recipe.stages, start=1) if STAGES[entry.name].distributed]
    follow_until = shared[-1] if shared else 0
    if world > 1:
        log(
            f"{world} processes: stage(s) {', '.join(recipe.stages[i - 1].name for i in shared) or 'none'} "
            f"run in all of them, every other step in process 0"
        )
        if not main and follow_until == 0:
            return run_dir
    record = {
        "recipe": str(recipe.path),
        "name": recipe.name,
        "overrides": list(overrides),
        "started": time.time(),
        "steps": [],
        "status": "running",
        "processes": world,
        "estimates": estimates,  # what the plan line said before the run, beside what each manifest measures
    }

    model_cfg = dataclasses.asdict(recipe.model)
    cache = CachePolicy(force, verify)
    checksums = ChecksumCache(Path(workdir) / ".checksums.json" if main else None, verify)
    model_fp, *stage_fps = fingerprints(recipe, checksums, world)
    if main:
        log(_plan_line(None if force else states(recipe, run_dir, [model_fp, *stage_fps]), recipe, estimates))
    build_model = lambda ctx: import_model(recipe.model, recipe.source, ctx.out_dir, log)  # noqa: E731
    try:
        model_step = lambda: _run_step(
            run_dir,
            0,
            "model",
            "hf-model",
            model_cfg,
            model_fp,
            (),
            build_model,  # noqa: E731
            cache,
            record,
        )
        art = distributed.on_main(model_step) if follow_until > 0 else model_step()
        history = (art,)
        exports = [entry.config for entry in recipe.stages if entry.name == "export"]
        if exports:  # before any stage's heavy work, not at export
            from transformers import AutoConfig

            export_spec(AutoConfig.from_pretrained(art.path))
            if any("gguf" in export.targets for export in exports):
                gguf_family(json.loads((art.path / "config.json").read_text()), "export.targets gguf")
        for i, entry in enumerate(recipe.stages, start=1):
            spec = STAGES[entry.name]
            cfg_dict = dataclasses.asdict(entry.config)
            fp = stage_fps[i - 1]
            build = functools.partial(spec.fn, entry.config, art)
            args = (run_dir, i, entry.name, spec.produces, cfg_dict, fp, history, build, cache, record)
            if spec.distributed and world > 1:
                art = _run_shared_step(*args)
            elif i < follow_until:  # processes 1.. wait for this step's artifact
                art = distributed.on_main(lambda: _run_step(*args))
            else:
                art = _run_step(*args)
            history += (art,)
            if not main and i == follow_until:
                return run_dir
        record["status"] = "passed"
        return run_dir
    except PipelineError as e:
        record["status"] = "failed"
        record["error"] = str(e)
        raise
    finally:
        if main:
            record["finished"] = time.time()
            write_json_atomic(run_dir / "run.json", record)


def _run_shared_step(run_dir, index, name, kind, cfg_dict, fp, history, build, cache, record) -> Artifact:
    """A distributed stage: process 0 decides whether the cached artifact stands; if not, every
    process runs the stage (process 0 into the step's temp folder, the others into scratch folders
    that are thrown away), then process 0 writes the manifest, puts the step in place and sends the
    artifact to the others."""
    if distributed.is_main():
        art = _reuse(run_dir, index, name, kind, fp, cache, record)
        distributed.share(art)
        if art is None:
            art = _build_step(run_dir, index, name, kind, cfg_dict, fp, history, build, record, cache.force)
            distributed.share(art)
    else:
        art = distributed.share()
        if art is None:
            scratch = Path(tempfile.mkdtemp(prefix=f"optimize-rank{distributed.rank()}-"))
            try:
                build(
                    RunContext(
                        run_dir=run_dir,
                        out_dir=scratch,
                        baseline=history[0],
                        history=history,
                        log=log,
                        step=_step_name(index, name, fp),
                        fresh=cache.force,
                    )
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            art = distributed.share()
    _raise_if_failed(art)
    return art


def _run_step(run_dir, index, name, kind, cfg_dict, fp, history, build, cache, record) -> Artifact:
    art = _reuse(run_dir, index, name, kind, fp, cache, record)
    if art is None:
        art = _build_step(run_dir, index, name, kind, cfg_dict, fp, history, build, record, cache.force)
    _raise_if_failed(art)
    return art


def _step_name(index: int, name: str, fp: str) -> str:
    return f"{index:02d}-{name}-{fp[:12]}"


def _build_step(run_dir, index, name, kind, cfg_dict, fp, history, build, record, fresh: bool) -> Artifact:
    """Run the stage into a temp folder and put it in place; the caller raises if its gate failed."""
    final = run_dir / _step_name(index, name, fp)
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"[{index:02d}] {name}: running (fp {fp[:12]})")
    tmp.mkdir()
    started = time.time()
    reset = resources.reset_peaks()
    try:
        ctx = RunContext(
            run_dir=run_dir,
            out_dir=tmp,
            baseline=history[0] if history else None,
            history=history,
            log=log,
            step=final.name,
            fresh=fresh,
        )
        result: StageResult = build(ctx)
        manifest = _manifest(
            name, kind, cfg_dict, fp, history[-1] if history else None, result, tmp, started, resources.peaks(reset)
        )
        write_json_atomic(tmp / MANIFEST, manifest)
        _put_in_place(tmp, final, run_dir, f"{index:02d}-{name}-*")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, PipelineError):
            raise
        if isinstance(e, Exception):
            raise StageError(f"stage {name} failed: {type(e).__name__}: {e}") from e
        raise
    seconds = time.time() - started
    figures = ", ".join(f"{k}={_fmt(v)}" for k, v in list(result.metrics.items())[:6])
    used = manifest["resources"]
    memory = f"peak RSS {used['peak_rss_mb'] / 1024:.1f} GiB" + (
        f", GPU {used['peak_gpu_mb'] / 1024:.1f} GiB" if "peak_gpu_mb" in used else ""
    )
    log(f"[{index:02d}] {name}: done in {seconds:.1f}s, {memory} -> {final}" + (f" ({figures})" if figures else ""))
    record["steps"].append({"index": index, "stage": name, "dir": final.name, "cached": False, "seconds": seconds})
    return Artifact(final, manifest)


def _reuse(run_dir, index, name, kind, fp, cache: CachePolicy, record) -> Artifact | None:
    """The step's artifact if it is already built, in this run folder or (hard-linked) from another."""
    final = run_dir / _step_name(index, name, fp)
    if final.exists() and not cache.force:
        art, why = load_verified(final, fp, cache.verify)
        if art is not None:
            log(f"[{index:02d}] {name}: unchanged (fp {fp[:12]}), reusing {final}")
            record["steps"].append({"index": index, "stage": name, "dir": final.name, "cached": True})
            return art
        log(f"[{index:02d}] {name}: cached artifact rejected ({why}); rebuilding")
    # a report names the run it checked, so only model-making steps are shared between run folders
    twin = None if cache.force or kind == "report" else _verified_twin(run_dir, final.name, fp, cache.verify)
    if twin is None:
        return None
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(twin.path, tmp, copy_function=_link_or_copy)
    _put_in_place(tmp, final, run_dir, f"{index:02d}-{name}-*")
    log(f"[{index:02d}] {name}: unchanged (fp {fp[:12]}), linked from {twin.path}")
    record["steps"].append({"index": index, "stage": name, "dir": final.name, "cached": True, "from": str(twin.path)})
    return Artifact(final, twin.manifest)


def _put_in_place(tmp: Path, final: Path, run_dir: Path, pattern: str) -> None:
    """The completed step replaces any older build of its stage (another fingerprint) in one rename."""
    for stale in run_dir.glob(pattern):
        shutil.rmtree(stale)
    os.replace(tmp, final)


def _verified_twin(run_dir: Path, step: str, fp: str, verify: bool) -> Artifact | None:
    """The same step (same fingerprint: same source, stages and settings up to it) completed in
    another run folder of this workdir, e.g. the model step that every recipe of one model shares."""
    for other in sorted(run_dir.parent.glob(f"*/{step}")):
        if other.parent != run_dir:
            art, _ = load_verified(other, fp, verify)
            if art is not None:
                return art
    return None


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links cost no space or time; artifacts are never changed in place (their checksums say so)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _manifest(name, kind, cfg_dict, fp, parent, result: StageResult, folder: Path, started: float, used: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": name,
        "stage_version": cfg_dict.get("version"),
        "kind": kind,
        "fingerprint": fp,
        "parent": parent.fingerprint if parent else None,
        "config": cfg_dict,
        "files": file_table(folder),
        "metrics": result.metrics,
        "passed": result.passed,
        "failures": result.failures,
        **result.info,
        "versions": library_versions(),
        "timing": {"started": started, "seconds": round(time.time() - started, 3)},
        "resources": used,
    }


def _raise_if_failed(art: Artifact) -> None:
    if not art.manifest.get("passed", True):
        report = art.path / "report.md"
        raise ValidationFailed(art.manifest.get("failures", []), str(report) if report.exists() else None)


def _remove_stale_temps(run_dir: Path) -> None:
    for tmp in run_dir.glob(".tmp-*"):
        log(f"removing incomplete step left by an interrupted run: {tmp.name}")
        shutil.rmtree(tmp, ignore_errors=True)


def fingerprints(recipe, checksums: ChecksumCache, world: int = 1) -> list[str]:
    """Every step's fingerprint, the model step's first: what names each step's folder and keys its cache."""
    model_cfg = dataclasses.asdict(recipe.model)
    # the source's identity is its content (or hub id), not how the recipe spells its path
    fp = fingerprint(
        "model",
        recipe.model.version,
        {k: v for k, v in model_cfg.items() if k != "source"},
        source_identity(recipe.source, checksums),
    )
    found = [fp]
    for entry in recipe.stages:
        # a training run's batches depend on how many processes share them (one process: as before)
        processes = (world,) if STAGES[entry.name].distributed and world > 1 else ()
        cfg_dict = dataclasses.asdict(entry.config)
        fp = fingerprint(fp, entry.name, cfg_dict, data_identity(entry.config, checksums), *processes)
        found.append(fp)
    return found


def states(recipe, run_dir: Path, fps: list[str]) -> list[tuple[str, str, str]]:
    """(step folder, stage, state) of the model step and each stage: cached in the run folder, linked
    from another run of the workdir, or to build (and every step after a rebuilt one)."""
    names = ["model", *(entry.name for entry in recipe.stages)]
    found, building = [], False
    for index, (name, fp) in enumerate(zip(names, fps)):
        step = _step_name(index, name, fp)
        state = "build"
        if not building:
            if load_verified(run_dir / step, fp)[0] is not None:
                state = "cached"
            elif name == "model" or STAGES[name].produces != "report":
                twin = _verified_twin(run_dir, step, fp, False)
                state = f"linked from {twin.path.parent.name}" if twin is not None else "build"
        building = building or state == "build"
        found.append((step, name, state))
    return found


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _plan_line(found: list[tuple[str, str, str]] | None, recipe, estimates: list[dict]) -> str:
    """Each step's state (every one to build under --force) with the estimated time of those to build, and their
    total."""
    found = found or [("", name, "build") for name in ("model", *(entry.name for entry in recipe.stages))]
    seconds = [e["seconds"] for e in estimates] if len(estimates) == len(found) else [None] * len(found)
    building = [t for (_, _, state), t in zip(found, seconds) if state == "build"]
    parts = [
        f"{name} {state}" + (f" (~{describe(t)})" if state == "build" and t is not None else "")
        for (_, name, state), t in zip(found, seconds)
    ]
    known = building and None not in building
    return "plan: " + ", ".join(parts) + (f"; about {describe(sum(building))} in all" if known else "")


def _check_memory(recipe) -> list[dict]:
    """Each step's estimated peak RSS and time (pipeline/estimate.py, estimate_time.py) in one line, returned for
    run.json; a step that cannot fit this machine stops the run here, before any heavy work, naming what
    would lower it."""
    try:
        shape = model_shape(recipe.source.kind, recipe.source.location, recipe.model.dtype)
    except (OSError, ValueError, KeyError, IndexError, struct.error) as e:  # the model step says what is wrong
        log(f"plan: no estimate ({recipe.source.location} unreadable: {type(e).__name__})")
        return []
    if shape is None:
        log("plan: no estimate before a hub model is downloaded")
        return []
    stages = [(e.name, e.config) for e in recipe.stages]
    steps = estimate(shape, stages)
    seconds = estimate_seconds(shape, stages, recipe.source.kind)
    total, available = memory_bytes()
    size = f"{shape.parameters / 1e9:.2f}B" if shape.parameters >= 1e9 else f"{shape.parameters / 1e6:.1f}M"
    log(
        f"plan: {size} parameters; estimated peak RSS "
        + ", ".join(s.describe() for s in steps)
        + (f"; this machine {total / 2**30:.1f} GiB ({available / 2**30:.1f} available)" if total else "")
    )
    worst = max(steps, key=lambda s: s.peak_bytes)
    if total and worst.peak_bytes > MARGIN * total:
        raise StageError(
            f"plan: the {worst.step} step needs about {worst.peak_bytes / 2**30:.0f} GiB and this machine has "
            f"{total / 2**30:.0f} GiB; {worst.knob}"
        )
    if available and worst.peak_bytes > available:
        log(f"plan: WARNING the {worst.step} step may need more than the {available / 2**30:.1f} GiB available now")
    return [
        {"step": s.step, "peak_rss_mb": round(s.peak_bytes / 2**20, 1), "seconds": None if t is None else round(t, 1)}
        for s, t in zip(steps, seconds)
    ]
