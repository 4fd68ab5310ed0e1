"""`optimize plan` says what a run would do: the recipe with its defaults, each step's state, memory."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import yaml
from conftest import ROOT, write_recipe

from pipeline import run
from pipeline.plan import plan_text, resolved, step_states
from pipeline.recipe import load_recipe


def test_the_plan_follows_the_workdir_from_nothing_to_cached_to_linked(tmp_path, tiny_llama, eval_text):
    recipe = write_recipe(tmp_path, tiny_llama, eval_text, "first")
    work = tmp_path / "work"
    loaded = load_recipe(recipe)
    assert [state for _, _, state in step_states(loaded, work)] == ["build"] * 3
    run(recipe, workdir=work)
    states = step_states(loaded, work)
    assert [state for _, _, state in states] == ["cached"] * 3
    assert [step for step, _, _ in states] == sorted(p.name for p in (work / "first").glob("[0-9][0-9]-*"))

    other = write_recipe(tmp_path, tiny_llama, eval_text, "second", export="{opset: 18, parity_tokens: 8}")
    states = [state for _, _, state in step_states(load_recipe(other), work)]
    assert states == ["linked from first", "build", "build"]  # a changed export rebuilds validate after it

    shutil.rmtree(next((work / "first").glob("01-export-*")))
    assert [state for _, _, state in step_states(loaded, work)] == ["cached", "build", "build"]


def test_the_resolved_recipe_holds_every_default_and_loads_back(tmp_path, tiny_llama, eval_text):
    loaded = load_recipe(write_recipe(tmp_path, tiny_llama, eval_text))
    data = yaml.safe_load(resolved(loaded))
    export = data["stages"][0]["export"]
    assert export["opset"] == 18 and export["fused"] is True and export["kv_cache"] == "float"
    back = tmp_path / "back.yaml"
    back.write_text(yaml.safe_dump(data))
    assert load_recipe(back).stages == loaded.stages  # the plan shows exactly what will run


def test_plan_text_lists_steps_with_their_memory_and_time(tmp_path, tiny_llama, eval_text):
    recipe = write_recipe(tmp_path, tiny_llama, eval_text)
    text = plan_text(load_recipe(recipe), tmp_path / "work")
    rows = [line.split() for line in text.splitlines() if line.startswith(("00-", "01-", "02-"))]
    assert [r[0].split("-")[1] for r in rows] == ["model", "export", "validate"]
    assert all(r[1] == "build" and r[3] == "GiB" and r[-1] == "s" and float(r[-2]) >= 0 for r in rows), rows
    assert "this machine:" in text
    run(recipe, workdir=tmp_path / "work")
    cached = [line.split() for line in plan_text(load_recipe(recipe), tmp_path / "work").splitlines()]
    assert [r[-1] for r in cached if r and r[0].startswith(("00-", "01-", "02-"))] == ["-"] * 3  # nothing to build


def test_optimize_plan_on_a_bad_recipe_is_one_line(tmp_path, tiny_llama):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\nmodel: {{source: {tiny_llama}}}\nstages: [{{export: {{opst: 17}}}}]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", str(bad)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "did you mean 'opset'" in done.stderr


def test_a_run_starts_with_the_same_states(tmp_path, tiny_llama, eval_text, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, eval_text, "again")
    run(recipe, workdir=tmp_path / "work")
    assert re.search(
        r"plan: model build \(~\d+ s\), export build \(~\d+ s\), validate build \(~\d+ s\); about \d+ s in all",
        capsys.readouterr().out,
    )
    # run.json keeps what the plan line estimated, beside what the manifests measured
    estimates = json.loads((tmp_path / "work" / "again" / "run.json").read_text())["estimates"]
    assert [e["step"] for e in estimates] == ["model", "export", "validate"]
    assert all(e["peak_rss_mb"] > 0 and e["seconds"] >= 0 for e in estimates)
    run(recipe, workdir=tmp_path / "work")
    assert "plan: model cached, export cached, validate cached" in capsys.readouterr().out
