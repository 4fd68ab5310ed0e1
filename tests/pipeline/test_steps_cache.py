"""Stage cache: reuse when unchanged, rebuild what changed and what follows, reject tampering."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_recipe

from pipeline import ValidationFailed, run
from pipeline.artifacts import load_verified


def steps(run_dir: Path) -> dict[str, Path]:
    return {p.name.split("-")[1]: p for p in sorted(run_dir.glob("[0-9][0-9]-*"))}


@pytest.fixture
def work(tmp_path, tiny_llama, eval_text):
    return tmp_path, write_recipe(tmp_path, tiny_llama, eval_text)


def test_second_run_reuses_every_stage(work, capsys):
    tmp, recipe = work
    run(recipe, workdir=tmp / "a")
    first = {k: v.stat().st_mtime_ns for k, v in steps(tmp / "a" / "tiny").items()}
    capsys.readouterr()
    run(recipe, workdir=tmp / "a")
    out = capsys.readouterr().out
    assert out.count("unchanged") == 3 and "running" not in out
    assert {k: v.stat().st_mtime_ns for k, v in steps(tmp / "a" / "tiny").items()} == first


def test_changing_a_stage_reruns_it_and_later_ones_only(work, tiny_llama, eval_text, capsys):
    tmp, recipe = work
    run(recipe, workdir=tmp / "a")
    capsys.readouterr()
    write_recipe(tmp, tiny_llama, eval_text, extra_validate="add_bos: true\n")
    run(recipe, workdir=tmp / "a")
    out = capsys.readouterr().out
    assert "[00] model: unchanged" in out and "[01] export: unchanged" in out and "[02] validate: running" in out
    assert len(list((tmp / "a" / "tiny").glob("02-validate-*"))) == 1  # the stale one is replaced


def test_tampered_artifact_is_detected_and_rebuilt(work, capsys):
    tmp, recipe = work
    run(recipe, workdir=tmp / "a")
    export = steps(tmp / "a" / "tiny")["export"]
    with open(export / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    art, why = load_verified(export)
    assert art is None and "model.onnx.data does not match its checksum" in why
    capsys.readouterr()
    run(recipe, workdir=tmp / "a")
    out = capsys.readouterr().out
    assert "[01] export: cached artifact rejected (file model.onnx.data does not match its checksum" in out
    assert "[02] validate: unchanged" in out  # same fingerprint chain: the rebuilt export is identical in meaning
    assert load_verified(export)[0] is not None


def test_missing_manifest_or_added_file_is_not_an_artifact(work):
    tmp, recipe = work
    run(recipe, workdir=tmp / "a")
    export = steps(tmp / "a" / "tiny")["export"]
    (export / "notes.txt").write_text("hand edit")
    assert "unexpected file notes.txt" in load_verified(export)[1]
    (export / "notes.txt").unlink()
    (export / "manifest.json").unlink()
    assert "no manifest" in load_verified(export)[1]


def test_force_rebuilds(work, capsys):
    tmp, recipe = work
    run(recipe, workdir=tmp / "a")
    capsys.readouterr()
    run(recipe, workdir=tmp / "a", force=True)
    assert capsys.readouterr().out.count("running") == 3


def test_failed_gate_keeps_report_and_fails_again_from_cache(work, tiny_llama, eval_text):
    tmp, recipe = work
    write_recipe(tmp, tiny_llama, eval_text, extra_validate="thresholds: {perplexity: 1.0, top1_agreement: 0.5}\n")
    with pytest.raises(ValidationFailed, match=r"perplexity = [\d.]+ > max 1") as e:
        run(recipe, workdir=tmp / "a")
    assert len(e.value.failures) == 1
    report = steps(tmp / "a" / "tiny")["validate"] / "report.md"
    assert "FAILED" in report.read_text()
    with pytest.raises(ValidationFailed):
        run(recipe, workdir=tmp / "a")


def test_run_killed_during_export_leaves_nothing_complete_and_recovers(work):
    tmp, recipe = work
    workdir = tmp / "a"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", str(recipe), "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((workdir / "tiny").glob(".tmp-01-export-*")):
        time.sleep(0.005)
    assert list((workdir / "tiny").glob(".tmp-01-export-*")), "export never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((workdir / "tiny").glob("01-export-*"))  # nothing that looks complete
    run(recipe, workdir=workdir)
    assert not list((workdir / "tiny").glob(".tmp-*"))
    for step in steps(workdir / "tiny").values():
        assert load_verified(step)[0] is not None


def test_editing_the_eval_text_reruns_validate(tmp_path, tiny_llama, eval_text, capsys):
    text = tmp_path / "own.txt"
    text.write_text(eval_text.read_text())
    recipe = write_recipe(tmp_path, tiny_llama, text)
    run(recipe, workdir=tmp_path / "a")
    text.write_text(eval_text.read_text() + "One more line of text at the end.\n")
    capsys.readouterr()
    run(recipe, workdir=tmp_path / "a")
    out = capsys.readouterr().out
    assert "[01] export: unchanged" in out and "[02] validate: running" in out


def test_another_recipe_in_the_same_workdir_links_the_steps_it_shares(work, capsys):
    tmp, recipe = work
    run(recipe, workdir=tmp / "a")
    capsys.readouterr()
    other = run(recipe, workdir=tmp / "a", overrides=["name=other", "validate.max_windows=2"])
    out = capsys.readouterr().out
    assert "[00] model: unchanged" in out and "[01] export: unchanged" in out and "linked from" in out
    assert "[02] validate: running" in out  # a report names its own run: never shared
    ours, theirs = steps(other), steps(tmp / "a" / "tiny")
    assert (ours["export"] / "model.onnx.data").stat().st_ino == (theirs["export"] / "model.onnx.data").stat().st_ino
    assert load_verified(ours["export"])[0] is not None


def test_a_tampered_twin_is_not_linked(work, capsys):
    tmp, recipe = work
    run(recipe, workdir=tmp / "a")
    with open(steps(tmp / "a" / "tiny")["export"] / "model.onnx.data", "r+b") as f:
        f.write(b"\x00\x01\x02\x03")
    capsys.readouterr()
    run(recipe, workdir=tmp / "a", overrides=["name=other"])
    out = capsys.readouterr().out
    assert "[00] model: unchanged" in out and "[01] export: running" in out


def test_the_model_step_is_keyed_by_the_sources_content_not_its_spelling(work, tiny_llama, eval_text):
    import os

    tmp, recipe = work
    sub = tmp / "elsewhere"
    sub.mkdir()
    relative = write_recipe(sub, Path(os.path.relpath(tiny_llama, sub)), eval_text)
    assert steps(run(recipe, workdir=tmp / "a"))["model"].name == steps(run(relative, workdir=tmp / "b"))["model"].name


def _count_hashes(monkeypatch) -> list[str]:
    import pipeline.artifacts

    hashed: list[str] = []
    real = pipeline.artifacts.sha256_file

    def counting(path, *a, **k):
        hashed.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(pipeline.artifacts, "sha256_file", counting)
    return hashed


def test_a_rerun_hashes_nothing_that_did_not_change_and_verify_hashes_everything(
    tmp_path, tiny_llama, eval_text, monkeypatch, capsys
):
    import shutil

    source, text = tmp_path / "ckpt", tmp_path / "eval.txt"
    shutil.copytree(tiny_llama, source)
    shutil.copy(eval_text, text)
    old = time.time_ns() - 3600 * 10**9  # sources last written an hour ago: not racily clean
    for p in [*source.iterdir(), text]:
        import os

        os.utime(p, ns=(old, old))
    recipe = write_recipe(tmp_path, source, text)
    run(recipe, workdir=tmp_path / "a")
    hashed = _count_hashes(monkeypatch)
    run(recipe, workdir=tmp_path / "a")
    assert hashed == []  # not the 11 source files, not the text, not one artifact file
    run(recipe, workdir=tmp_path / "a", verify=True)
    artifact_files = sum(
        len(json.loads((d / "manifest.json").read_text())["files"]) for d in steps(tmp_path / "a" / "tiny").values()
    )
    # every artifact file, every source file, the eval text and the export's built-in calibration text where local
    from calibration.datasets import local_file
    from pipeline.configs import ExportConfig

    cal = ExportConfig().kv_calibration.data
    texts = 1 + (local_file(cal.source, cal.split) is not None)
    assert len(hashed) == artifact_files + len(list(source.iterdir())) + texts and "eval.txt" in hashed
    # a source changed in place, size kept, is hashed again and rebuilds the model step
    hashed.clear()
    weights = source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    run(recipe, workdir=tmp_path / "a")
    assert hashed.count("model.safetensors") >= 1 and "[00] model: running" in capsys.readouterr().out


def test_a_source_written_just_before_it_was_hashed_is_hashed_again(tmp_path):
    from pipeline.artifacts import ChecksumCache

    f = tmp_path / "fresh.txt"
    f.write_text("abc")
    cache = ChecksumCache(tmp_path / "sums.json")
    first = cache.sha256(f)
    f.write_text("abd")  # same size, very likely the same timestamp tick
    assert ChecksumCache(tmp_path / "sums.json").sha256(f) != first


@pytest.mark.hostile
def test_a_second_run_of_a_live_run_refuses_and_leaves_its_temporary_folder(work):
    """The run folder is locked while a run works in it: a second run names the holder and touches nothing."""
    from pipeline.errors import StageError
    from pipeline.steps import _run_lock

    tmp, recipe = work
    run_dir = tmp / "a" / "tiny"
    run_dir.mkdir(parents=True)
    live = run_dir / ".tmp-01-export-0123456789ab-99999"
    live.mkdir()
    with _run_lock(run_dir, main=True):
        with pytest.raises(StageError, match=r"another run of this recipe is in progress \(pid \d+\); wait for it"):
            run(recipe, workdir=tmp / "a")
        assert live.is_dir() and not steps(run_dir)
    run(recipe, workdir=tmp / "a")  # released: this run takes the folder and clears what the dead run left
    assert not live.exists() and set(steps(run_dir)) == {"model", "export", "validate"}


@pytest.mark.hostile
def test_the_run_lock_dies_with_its_process(work):
    """kill -9 cannot leave the folder locked: the lock is the process's open file."""
    tmp, recipe = work
    run_dir = tmp / "a" / "tiny"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from pipeline.steps import _run_lock; "
            "ctx = _run_lock(Path(sys.argv[1]), True); ctx.__enter__(); print('held', flush=True); "
            "time.sleep(60)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run(recipe, workdir=tmp / "a")
    assert set(steps(run_dir)) == {"model", "export", "validate"}
