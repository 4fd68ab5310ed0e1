"""validate.chat: the chat set, its answer matching, its recipe checks, and the checks on the tiny model."""

import json
import textwrap

import pytest

from calibration.chat_set import FACTS, builtin_chat_set, load_chat_set, mentions
from calibration.datasets import DataError
from pipeline import RecipeError, load_recipe, run


def test_answers_are_matched_as_whole_words_ignoring_case_accents_and_hyphens():
    assert mentions("The capital of France is Paris.", ("Paris",))
    assert mentions("PARIS, of course", ("paris",))
    assert not mentions("Parisians love bread.", ("Paris",))
    assert mentions("A spider has 8 legs.", ("eight", "8"))
    assert not mentions("A spider has 18 legs.", ("eight", "8"))
    assert mentions("There are twenty four hours.", ("twenty-four",))
    assert mentions("Il s'appelle Bogotá", ("Bogota",))
    assert mentions("It is H2O.", ("H2O",)) and not mentions("It is H2O2.", ("H2O",))


def test_builtin_set_holds_facts_and_open_instructions_and_no_question_gives_its_answer_away():
    items = builtin_chat_set()
    facts = [i for i in items if i.answers]
    assert len(facts) == len(FACTS) >= 50 and len(items) - len(facts) >= 12
    assert len({i.prompt for i in items}) == len(items)
    assert not [i.prompt for i in facts if mentions(i.prompt, i.answers)]


def test_custom_chat_set_lines_are_checked_with_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "Capital of Peru?", "answers": ["Lima"]}\n\n{"prompt": "Say hi."}\n')
    items = load_chat_set(path)
    assert [(i.prompt, i.answers) for i in items] == [("Capital of Peru?", ("Lima",)), ("Say hi.", ())]
    for line, message in [
        ('{"prompt": ""}', "needs a non-empty"),
        ('{"prompt": "x", "answers": [1]}', "list of non-empty"),
        ('{"prompt": "x", "answer": ["y"]}', "unknown key"),
        ("prompt: x", "not JSON"),
    ]:
        path.write_text('{"prompt": "fine"}\n' + line + "\n")
        with pytest.raises(DataError, match=rf"set.jsonl:2: .*{message}"):
            load_chat_set(path)


def _recipe(tmp_path, tiny_llama, eval_text, validate: str):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        model: {{source: {tiny_llama}}}
        stages:
          - export: {{}}
          - validate: {{eval_data: {{source: {eval_text}}}, {validate}}}
        """)
    )
    return path


def test_recipe_refuses_bad_chat_settings_up_front(tmp_path, tiny_llama, eval_text):
    with pytest.raises(
        RecipeError,
        match=r"validate\.thresholds\.chat_fact_accuracy: measured by the chat checks, "
        r"which are off; add `chat: \{\}`",
    ):
        load_recipe(_recipe(tmp_path, tiny_llama, eval_text, "thresholds: {chat_fact_accuracy: 0.3}"))
    with pytest.raises(RecipeError, match=r"validate\.chat\.prompts: '.*facts.txt' is not a .jsonl file"):
        (tmp_path / "facts.txt").write_text("What is 2 + 2?\n")
        load_recipe(_recipe(tmp_path, tiny_llama, eval_text, "chat: {prompts: facts.txt}"))
    with pytest.raises(RecipeError, match=r"validate\.chat\.prompts\.source: text file .*missing.jsonl not found"):
        load_recipe(_recipe(tmp_path, tiny_llama, eval_text, "chat: {prompts: missing.jsonl}"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"question": "no"}\n')
    with pytest.raises(RecipeError, match=r"validate\.chat\.prompts: .*bad.jsonl:2: needs a non-empty \"prompt\""):
        load_recipe(_recipe(tmp_path, tiny_llama, eval_text, "chat: {prompts: bad.jsonl}"))
    (tmp_path / "good.jsonl").write_text('{"prompt": "ok", "answers": ["yes"]}\n')
    chat = load_recipe(_recipe(tmp_path, tiny_llama, eval_text, "chat: {prompts: good.jsonl}")).stages[1].config.chat
    assert chat.prompts.source == str(tmp_path / "good.jsonl") and chat.max_new_tokens == 64


def test_chat_checks_on_the_tiny_model(tmp_path, tiny_llama, eval_text):
    """The fp32 export answers as its own PyTorch model does, so every chat metric equals the baseline's; the
    verdicts and the accuracy are those of the replies in the report."""
    chat_set = tmp_path / "chat.jsonl"
    chat_set.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "The capital of France is", "answers": ["Paris"]},
                {"prompt": "The quick brown fox", "answers": ["lazy", "dog", "the"]},
                {"prompt": "Once upon a time"},
            ]
        )
        + "\n"
    )
    validate = (
        f"context_length: 64, max_windows: 2, max_new_tokens: 4, prompts: [hello],\n"
        f"              chat: {{prompts: {chat_set}, max_new_tokens: 12, batch_size: 2}},\n"
        "              thresholds: {chat_fact_accuracy_delta: 0, chat_reply_top1_agreement: 0.99, "
        "chat_reply_perplexity: 1000}"
    )
    run_dir = run(_recipe(tmp_path, tiny_llama, eval_text, validate), workdir=tmp_path / "artifacts")
    folder = next(run_dir.glob("02-validate-*"))
    report = json.loads((folder / "report.json").read_text())
    m = report["metrics"]
    assert report["passed"], report["failures"]
    assert m["chat_fact_accuracy"] == m["chat_fact_accuracy_baseline"] and m["chat_fact_accuracy_delta"] == 0
    assert m["chat_turn_end_rate"] == m["chat_turn_end_rate_baseline"]
    assert m["chat_reply_perplexity"] == pytest.approx(m["chat_reply_perplexity_baseline"], rel=1e-3)
    replies = report["chat"]["replies"]
    assert [r["prompt"] for r in replies] == ["The capital of France is", "The quick brown fox", "Once upon a time"]
    assert all(r["onnx"] == r["baseline"] for r in replies)  # greedy, batched two and one, on both sides
    assert replies[2]["onnx_correct"] is None  # an open instruction has no verdict
    verdicts = [mentions(r["onnx"], tuple(r["answers"])) for r in replies[:2]]
    assert [r["onnx_correct"] for r in replies[:2]] == verdicts and m["chat_fact_accuracy"] == sum(verdicts) / 2
    md = (folder / "report.md").read_text()
    assert "## Chat replies" in md and "Open instructions:" in md and "**Once upon a time**" in md
