"""A distill recipe under `torchrun` with 2 processes (gloo on this CPU): the student equals the one a
single process trains on both processes' blocks, the rest of the recipe runs in process 0 alone,
process 0 alone speaks, and a killed 2-process run resumes to the same student."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_checkpoint
from safetensors.torch import load_file

from pipeline import run
from pipeline.distill.teacher_answers import read_answers
from runtime.tokenizer import Tokenizer

# several processes each start torch: minutes in all, so in `make test` only, one test at a time
pytestmark = [pytest.mark.slow, pytest.mark.serial]

# float32 (bf16 autocast rounds differently for 2 and 4 rows); 2 blocks a process = 4 in one process
DISTILL = (
    "num_layers: 2, layer_choice: loss, intermediate_size: 96, sequence_length: 32, batch_size: {batch}, "
    "grad_accum: 2, tokens: 2048, eval_every: 4, checkpoint_every: 2, eval_samples: 4, importance_samples: 4, "
    "heldout_fraction: 0.2, bf16: 'false', teacher_correction: {{tokens: 1024, lr: 0.003}}, "
    "teacher_answers: {{samples: 8, prompts: {{source: {prompts}}}, max_new_tokens: 24, batch_size: 4}}"
)

# `optimize` killed after distill step $KILL_AT_STEP; with $ONLY_PROCESS_0_READS_WEIGHTS, loading a model's
# weights fails in every other process
WRAPPED = """\
import os
import sys
import transformers
import pipeline.stages.distill as stage
from pipeline.cli import main

def refuse(*args, **kwargs):
    raise AssertionError("a process other than 0 read a model's weights")

if os.environ.get("ONLY_PROCESS_0_READS_WEIGHTS") and os.environ["RANK"] != "0":
    transformers.AutoModelForCausalLM.from_pretrained = refuse
real_train = stage.train

def killed(*args, **kwargs):
    def on_step(step):
        if step == int(os.environ.get("KILL_AT_STEP", 0)):
            raise KeyboardInterrupt
    return real_train(*args, **kwargs, on_step=on_step)

stage.train = killed
main(args=sys.argv[1:])
"""


def _recipe(folder: Path, teacher: Path, text: Path, batch: int, parallel: str = "ddp") -> Path:
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"Tell me about the number {i}.\n" for i in range(12)))
    path = folder / f"d{batch}{'-fsdp' if parallel == 'fsdp' else ''}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: d
        model: {{source: {teacher}}}
        stages:
          - distill: {{{DISTILL.format(batch=batch, prompts=prompts)}, parallel: {parallel}, train_data: [{{source: {text}}}]}}
          - quantize: {{method: rtn, bits: 4, group_size: 32}}
          - export: {{}}
        """)
    )
    return path


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def _errors(stderr: str) -> list[str]:
    """Our CLI's error lines (a progress bar may precede one on its line)."""
    return re.findall(r"error: [^\n]*", stderr)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(run_dir.glob("01-distill-*")) / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, eval_text):
    folder = tmp_path_factory.mktemp("processes")
    teacher = make_checkpoint(folder / "teacher", "llama", layers=4)
    one = run(_recipe(folder, teacher, eval_text, batch=4), workdir=folder / "one")
    two = _torchrun(
        "-m", "pipeline", str(_recipe(folder, teacher, eval_text, batch=2)), "--workdir", str(folder / "two")
    )
    assert two.returncode == 0, two.stderr[-3000:]
    return folder, teacher, one, folder / "two" / "d", two


def test_two_processes_train_the_student_one_process_trains_on_their_blocks(runs):
    folder, teacher, one, two, _ = runs
    a, b = _weights(one), _weights(two)
    start = load_file(str(teacher / "model.safetensors"))["model.embed_tokens.weight"]
    assert (a["model.embed_tokens.weight"] - start).abs().max() > 1e-4  # training moved the weights
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    m1 = json.loads((next(one.glob("01-distill-*")) / "manifest.json").read_text())
    m2 = json.loads((next(two.glob("01-distill-*")) / "manifest.json").read_text())
    assert (m1["metrics"]["processes"], m2["metrics"]["processes"]) == (1, 2)
    # the same token budget in half as many steps per process: 8 steps of 4 blocks x 2 micro-batches x 32 tokens
    assert m1["metrics"]["tokens_seen"] == m2["metrics"]["tokens_seen"] == 2048
    assert len(m2["training"]["loss"]) == 8 and m2["training"]["eval_steps"] == [4, 8]
    assert m2["teacher_correction"]["tokens"] == 1024
    assert m2["metrics"]["perplexity"] == pytest.approx(m1["metrics"]["perplexity"], rel=1e-4)
    # process 0 sampled the answers once; both processes trained on them
    ids = [read_answers(next(r.glob("01-distill-*")) / "teacher_answers.jsonl", Tokenizer(teacher)) for r in (one, two)]
    assert ids[0] == ids[1] and len(ids[0]) > 0


def test_process_0_finishes_the_recipe_and_speaks_for_both(runs):
    _, _, _, two, out = runs
    assert next(two.glob("03-export-*")).is_dir()
    record = json.loads((two / "run.json").read_text())
    assert record["processes"] == 2 and record["status"] == "passed" and len(record["steps"]) == 4
    assert out.stdout.count("done: ") == 1 and out.stdout.count("[01] distill: running") == 1
    assert "training on cpu" in out.stdout and "(2 process(es), DDP)" in out.stdout
    assert not list(two.glob(".resume-*")) and not list(two.glob(".tmp-*"))


def test_a_killed_two_process_run_resumes_to_the_same_student(runs, tmp_path, monkeypatch):
    folder, _, _, two, _ = runs
    script = tmp_path / "killed.py"
    script.write_text(WRAPPED)
    recipe_file = folder / "d2.yaml"  # the fixture's 2-process recipe
    monkeypatch.setenv("KILL_AT_STEP", "5")
    killed = _torchrun(str(script), str(recipe_file), "--workdir", str(tmp_path / "w"))
    assert killed.returncode != 0
    state = next((tmp_path / "w" / "d").glob(".resume-01-distill-*")) / "state"
    progress = json.loads((state / "progress.json").read_text())
    assert (progress["step"], progress["processes"]) == (4, 2)
    assert {p.name for p in state.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    resumed = _torchrun("-m", "pipeline", str(recipe_file), "--workdir", str(tmp_path / "w"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at step 4 of 8" in resumed.stdout
    a, b = _weights(two), _weights(tmp_path / "w" / "d")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_a_failure_in_process_0_ends_every_process_with_one_message(tmp_path, eval_text):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file" * 64)
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: broken
        model: {{source: {gguf}}}
        stages:
          - distill: {{num_layers: 1, train_data: [{{source: {eval_text}}}]}}
        """)
    )
    out = _torchrun("-m", "pipeline", str(recipe), "--workdir", str(tmp_path / "w"))  # process 1 waits for the import
    assert out.returncode != 0
    errors = _errors(out.stderr)
    assert len(errors) == 1 and "broken.gguf" in errors[0], out.stderr[-2000:]


NAN_IN_PROCESS_1 = """\
import os
import sys
import pipeline.distill.train as train
from pipeline.cli import main

real_loss, calls = train._loss, [0]

def loss(*args):  # the teacher correction's 5th micro-batch: step 3 of 4 (2 micro-batches a step)
    calls[0] += 1
    value = real_loss(*args)
    return value * float("nan") if calls[0] == 5 and os.environ["RANK"] == "1" else value

train._loss = loss
main(args=sys.argv[1:])
"""


def test_a_nan_loss_in_one_process_stops_both_at_the_same_step(runs, tmp_path):
    folder = runs[0]
    script = tmp_path / "nan.py"
    script.write_text(NAN_IN_PROCESS_1)
    out = _torchrun(str(script), str(folder / "d2.yaml"), "--workdir", str(tmp_path / "w"))
    assert out.returncode != 0
    errors = _errors(out.stderr)
    assert len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith(
        "error: distill: the loss is nan in process 1 at step 3; the last good checkpoint (step 2)"
    )
    # both processes stopped there: each saved its random state at step 2, none went on to step 4
    state = next((tmp_path / "w" / "d").glob(".resume-01-distill-*")) / "correction" / "state"
    assert json.loads((state / "progress.json").read_text())["step"] == 2


@pytest.fixture(scope="module")
def fsdp(runs, eval_text):
    folder, teacher = runs[0], runs[1]
    recipe = _recipe(folder, teacher, eval_text, batch=2, parallel="fsdp")
    script = folder / "fsdp.py"
    script.write_text(WRAPPED)
    # processes 1.. of an FSDP run never read a model's weights (nor does the killed and resumed run below)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ONLY_PROCESS_0_READS_WEIGHTS", "1")
        out = _torchrun(str(script), str(recipe), "--workdir", str(folder / "fsdp"))
    assert out.returncode == 0, out.stderr[-3000:]
    return script, recipe, folder / "fsdp" / "d", out


def test_fsdp_shards_teacher_and_student_and_trains_the_same_student(runs, fsdp):
    _, _, one, two, _ = runs
    _, _, sharded, out = fsdp
    a, b, c = _weights(one), _weights(two), _weights(sharded)
    for name in a:  # corrected teacher gathered, pruned, sharded again, trained, gathered: the same student
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(c[name], b[name], rtol=0, atol=1e-5)
    assert "(2 process(es), FSDP)" in out.stdout
    # each process holds half of every model (FSDP pads a shard only when a dimension does not split evenly)
    held = [
        tuple(map(float, m))
        for m in re.findall(
            r"FSDP: each process holds ([\d.]+)M of the student's ([\d.]+)M "
            r"parameters and ([\d.]+)M of the teacher's ([\d.]+)M",
            out.stdout,
        )
    ]
    assert len(held) == 2  # teacher correction, then distillation
    for s_here, s_all, t_here, t_all in held:
        assert s_here == pytest.approx(s_all / 2, abs=0.01) and t_here == pytest.approx(t_all / 2, abs=0.01)
    manifest = json.loads((next(sharded.glob("01-distill-*")) / "manifest.json").read_text())
    assert manifest["metrics"]["processes"] == 2 and manifest["metrics"]["tokens_seen"] == 2048
    # the layers were scored on the sharded teacher, by both processes: the scores of one process alone
    alone = json.loads((next(one.glob("01-distill-*")) / "manifest.json").read_text())["pruning"]["layer_scores"]
    assert manifest["pruning"]["layer_scores"] == pytest.approx(alone, abs=1e-5)
    training = manifest["training"]
    assert training["student_parameters_held"] * 2 == pytest.approx(sum(p.numel() for p in c.values()), rel=1e-3)
    assert len(training["peak_rss_mib"]) == 2 and min(training["peak_rss_mib"]) > 100  # every process's, in MiB
    assert json.loads((sharded / "run.json").read_text())["status"] == "passed"


def test_a_killed_fsdp_run_resumes_from_its_shards_to_the_same_student(fsdp, tmp_path, monkeypatch):
    script, recipe, sharded, _ = fsdp
    monkeypatch.setenv("ONLY_PROCESS_0_READS_WEIGHTS", "1")
    monkeypatch.setenv("KILL_AT_STEP", "5")
    killed = _torchrun(str(script), str(recipe), "--workdir", str(tmp_path / "w"))
    assert killed.returncode != 0
    state = next((tmp_path / "w" / "d").glob(".resume-01-distill-*")) / "state"
    progress = json.loads((state / "progress.json").read_text())
    assert (progress["step"], progress["processes"], progress["fsdp"]) == (4, 2, True)
    assert len(list((state / "fsdp").glob("*.distcp"))) == 2  # one file of shards per process
    monkeypatch.delenv("KILL_AT_STEP")
    resumed = _torchrun(str(script), str(recipe), "--workdir", str(tmp_path / "w"))  # corrected teacher read back
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "teacher correction: read from the interrupted run" in resumed.stdout
    assert "resuming from the checkpoint at step 4 of 8" in resumed.stdout
    a, b = _weights(sharded), _weights(tmp_path / "w" / "d")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
