"""The distill stage on a tiny teacher: a smaller student checkpoint the next stages take, a manifest
with the plan and the curves, resume after a kill equal to an uninterrupted run, and clear errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file

from pipeline import StageError, run
from pipeline.distill.teacher_answers import read_answers
from runtime import Generator, find_model_folder
from runtime.tokenizer import Tokenizer

SETTINGS = (
    "num_layers: 2, layer_choice: loss, intermediate_size: 96, sequence_length: 32, batch_size: 2, "
    "grad_accum: 2, tokens: 1024, eval_every: 4, checkpoint_every: 2, eval_samples: 4, importance_samples: 4, "
    "heldout_fraction: 0.2"
)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("teacher4"), "llama", layers=4)


def _recipe(folder, teacher, text, settings: str = SETTINGS, extra_stages: str = "") -> object:
    path = folder / "d.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: d
        model: {{source: {teacher}}}
        stages:
          - distill: {{{settings}, train_data: [{{source: {text}}}]}}
        """)
        + extra_stages
    )
    return path


def _killed_at_step_5(real_train):
    """`train` as the stage calls it, raising KeyboardInterrupt after step 5 (after the checkpoint at step 4)."""

    def killed(*args, **kwargs):
        def on_step(step):
            if step == 5:
                raise KeyboardInterrupt

        return real_train(*args, **kwargs, on_step=on_step)

    return killed


def _assert_same_weights(step_a, step_b) -> None:
    a = load_file(str(step_a / "model.safetensors"))
    b = load_file(str(step_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_student_is_smaller_trained_and_exportable(tmp_path, teacher, eval_text):
    stages = "  - quantize: {method: rtn, bits: 4, group_size: 32}\n  - export: {}\n"
    run_dir = run(_recipe(tmp_path, teacher, eval_text, extra_stages=stages), workdir=tmp_path / "a")
    step = next(run_dir.glob("01-distill-*"))
    manifest = json.loads((step / "manifest.json").read_text())
    config = json.loads((step / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (2, 96)
    assert len(manifest["pruning"]["kept_layers"]) == 2 and len(manifest["pruning"]["layer_scores"]) == 4
    m = manifest["metrics"]
    assert m["parameters"] < m["teacher_parameters"] and m["tokens_seen"] == 1024
    assert manifest["training"]["eval_steps"] == [4, 8] and len(manifest["training"]["loss"]) == 8
    assert m["kl_to_teacher"] < m["pruned_kl_to_teacher"]  # training moved the student towards the teacher
    assert manifest["teacher"]["layers"] == 4 and (step / "training.png").stat().st_size > 1000
    assert not list(run_dir.glob(".resume-*"))  # checkpoints go once the step is complete
    gen = Generator(find_model_folder(run_dir), provider="cpu")
    assert len(gen.generate([[5, 6, 7]], 4, ignore_eos=True).tokens[0]) == 4


@pytest.mark.hostile
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, teacher, eval_text, monkeypatch):
    import pipeline.stages.distill as stage

    whole = run(_recipe(tmp_path, teacher, eval_text), workdir=tmp_path / "whole")
    real_train = stage.train
    monkeypatch.setattr(stage, "train", _killed_at_step_5(real_train))
    with pytest.raises(KeyboardInterrupt):
        run(_recipe(tmp_path, teacher, eval_text), workdir=tmp_path / "resumed")
    assert list((tmp_path / "resumed" / "d").glob(".resume-*/state/progress.json"))
    monkeypatch.setattr(stage, "train", real_train)
    real_load, loads = torch.load, []

    def tensors_only(*args, **kwargs):  # a resume unpickles nothing: a file planted in the workdir cannot run code
        loads.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True, f"torch.load without weights_only: {args[:1]}"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", tensors_only)
    resumed = run(_recipe(tmp_path, teacher, eval_text), workdir=tmp_path / "resumed")
    assert loads  # the optimizer and random states were read back
    _assert_same_weights(next(whole.glob("01-distill-*")), next(resumed.glob("01-distill-*")))
    history = json.loads((next(resumed.glob("01-distill-*")) / "manifest.json").read_text())["training"]
    assert history["steps"] == list(range(1, 9))  # the resumed run's curve is whole


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, teacher, eval_text, monkeypatch):
    import pipeline.distill.train as train_mod

    calls = [0]
    real = train_mod._loss

    def nan_in_step_3(*args):  # one call per micro-batch, 2 per step
        calls[0] += 1
        return real(*args) * (float("nan") if calls[0] == 5 else 1.0)

    monkeypatch.setattr(train_mod, "_loss", nan_in_step_3)
    with pytest.raises(StageError, match=r"the loss is nan at step 3; the last good checkpoint \(step 2\) is kept"):
        run(_recipe(tmp_path, teacher, eval_text), workdir=tmp_path / "a")


@pytest.mark.parametrize(
    "settings,message",
    [
        ("num_layers: 9", r"distill.num_layers: 9 is not between 1 and the teacher's 4 layers"),
        (
            "num_layers: 2, heldout_fraction: 0.01",
            r"distill: the held-out text has \d+ tokens, fewer than one block of 256",
        ),
        (
            "num_layers: 2, batch_size: 4000",
            r"distill.train_data: \d+ blocks of 256 tokens, fewer than one batch of 4000",
        ),
        (
            "num_layers: 2, loss: {hidden: 1.0, layer_map: {'5': 1}}",
            r"distill.loss.layer_map.5: the student has layers 0..1",
        ),
        ("num_layers: 2, loss: {hidden: 1.0, layer_map: {'1': 7}}", r"teacher layer 7 does not exist"),
    ],
)
def test_bad_shapes_and_data_are_named(tmp_path, teacher, eval_text, settings, message):
    if "heldout_fraction" not in settings:
        settings += ", heldout_fraction: 0.2"
    with pytest.raises(StageError, match=message):
        run(_recipe(tmp_path, teacher, eval_text, settings=settings), workdir=tmp_path / "a")


def test_teacher_answers_join_the_training_text_and_survive_a_kill(tmp_path, teacher, eval_text, monkeypatch):
    import pipeline.stages.distill as stage

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about the number {i}.\n" for i in range(24)))
    settings = (
        SETTINGS + f", teacher_answers: {{samples: 20, prompts: {{source: {prompts}}}, max_new_tokens: 120, "
        "temperature: 1.5, batch_size: 10}"
    )
    calls, real_answers, real_train = [], stage.teacher_answers, stage.train

    def counted(*args, **kwargs):
        calls.append(1)
        return real_answers(*args, **kwargs)

    monkeypatch.setattr(stage, "teacher_answers", counted)
    monkeypatch.setattr(stage, "train", _killed_at_step_5(real_train))
    with pytest.raises(KeyboardInterrupt):
        run(_recipe(tmp_path, teacher, eval_text, settings=settings), workdir=tmp_path / "a")
    monkeypatch.setattr(stage, "train", real_train)
    run_dir = run(_recipe(tmp_path, teacher, eval_text, settings=settings), workdir=tmp_path / "a")
    assert len(calls) == 1  # the resumed run trained on the answers the killed one wrote
    step = next(run_dir.glob("01-distill-*"))
    manifest = json.loads((step / "manifest.json").read_text())
    rows = [json.loads(line) for line in (step / "teacher_answers.jsonl").read_text().splitlines()]
    assert 0 < len(rows) == manifest["metrics"]["teacher_answers"] <= 20
    assert all(
        r["prompt"].startswith("Tell me about the number") and set(r) == {"prompt", "answer", "ids"} for r in rows
    )
    # another run reads back the very conversations this one trained on (system prompt and all)
    assert [r["ids"] for r in read_answers(step / "teacher_answers.jsonl", Tokenizer(step))] == [r["ids"] for r in rows]
    replies = manifest["sample_replies"]
    assert [r["prompt"] for r in replies] == list(stage.REPLY_PROMPTS) and all(
        set(r) == {"prompt", "teacher", "student"} for r in replies
    )


def test_a_prompt_file_too_short_for_the_samples_is_named(tmp_path, teacher, eval_text):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("One prompt.\n")
    settings = SETTINGS + f", teacher_answers: {{samples: 4, prompts: {{source: {prompts}}}}}"
    with pytest.raises(
        StageError, match=r"distill.teacher_answers.prompts: .*prompts.txt: 1 prompts, fewer than the 4"
    ):
        run(_recipe(tmp_path, teacher, eval_text, settings=settings), workdir=tmp_path / "a")


CORRECTION = SETTINGS + ", teacher_correction: {tokens: 1024, lr: 0.003}"


def test_teacher_correction_adapts_the_teacher_first_and_survives_a_kill(tmp_path, teacher, eval_text, monkeypatch):
    import pipeline.distill.correct as correct
    import pipeline.stages.distill as stage

    whole = run(_recipe(tmp_path, teacher, eval_text, settings=CORRECTION), workdir=tmp_path / "whole")
    step = next(whole.glob("01-distill-*"))
    manifest = json.loads((step / "manifest.json").read_text())
    m, info = manifest["metrics"], manifest["teacher_correction"]
    assert info["tokens"] == 1024 and info["lr"] == 0.003 and len(info["curve"]) == 2  # 8 steps, evaluated at 4 and 8
    # the random teacher learns the text, and the student is pruned from (and imitates) the corrected one
    assert m["corrected_teacher_perplexity"] == info["heldout_perplexity"] < 0.8 * m["teacher_perplexity"]
    plain = json.loads(
        (
            next(run(_recipe(tmp_path, teacher, eval_text), workdir=tmp_path / "plain").glob("01-distill-*"))
            / "manifest.json"
        ).read_text()
    )["metrics"]
    assert m["pruned_perplexity"] < 0.8 * plain["pruned_perplexity"]
    assert m["teacher_perplexity"] == pytest.approx(
        plain["teacher_perplexity"]
    )  # still the teacher the stage was given

    corrections, real_correct_train, real_train = [], correct.train, stage.train

    def counted(*args, **kwargs):
        corrections.append(1)
        return real_correct_train(*args, **kwargs)

    monkeypatch.setattr(correct, "train", counted)
    monkeypatch.setattr(stage, "train", _killed_at_step_5(real_train))
    with pytest.raises(KeyboardInterrupt):
        run(_recipe(tmp_path, teacher, eval_text, settings=CORRECTION), workdir=tmp_path / "resumed")
    monkeypatch.setattr(stage, "train", real_train)
    resumed = run(_recipe(tmp_path, teacher, eval_text, settings=CORRECTION), workdir=tmp_path / "resumed")
    assert len(corrections) == 1  # the resumed run read the corrected teacher back
    _assert_same_weights(step, next(resumed.glob("01-distill-*")))


@pytest.mark.parametrize(
    "value,message",
    [
        ("{tokens: 0}", r"distill\.teacher_correction\.tokens: must be a positive integer, got 0"),
        ("{lr: -1.0}", r"distill\.teacher_correction\.lr: must be positive, got -1.0"),
        ("{steps: 5}", r"distill\.teacher_correction\.steps: unknown key"),
    ],
)
def test_bad_teacher_correction_is_named(tmp_path, teacher, eval_text, value, message):
    from pipeline import RecipeError
    from pipeline.recipe import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(tmp_path, teacher, eval_text, settings=SETTINGS + f", teacher_correction: {value}"))


def test_a_bad_parallel_mode_is_named(tmp_path, teacher, eval_text):
    from pipeline import RecipeError
    from pipeline.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"distill\.parallel: 'zero3' is not one of ddp, fsdp"):
        load_recipe(_recipe(tmp_path, teacher, eval_text, settings=SETTINGS + ", parallel: zero3"))


def test_keep_fraction_sets_the_depth_from_the_teachers(tmp_path):
    from pipeline.configs import DistillConfig
    from pipeline.errors import RecipeError
    from pipeline.models import load_torch_model
    from pipeline.stages.distill import _prune

    teacher = load_torch_model(make_checkpoint(tmp_path / "t", layers=6))
    student, keep = _prune(DistillConfig(keep_fraction=0.67, layer_choice="uniform"), teacher, None, None)
    assert len(keep) == 4 and student.config.num_hidden_layers == 4  # round(0.67 * 6)
    for bad in ({"keep_fraction": 1.0}, {"keep_fraction": 0.5, "num_layers": 2}, {}):
        with pytest.raises(RecipeError, match="keep_fraction"):
            DistillConfig(**bad)
