"""Prompt sources for the teacher's answers: the built-in set (seeded, distinct, quoting the training
text), a text file with one prompt per line, and clear errors when there are too few."""

import pytest

from calibration import DataError
from calibration.prompts import PASSAGE_TEMPLATES, TOPIC_TEMPLATES, TOPICS, builtin_prompts, load_prompts

TEXT = "\n".join(
    [" = Heading = ", ""]
    + [
        f" Paragraph {i} tells of the lighthouse @-@ keeper , who kept the lamp lit for {i} winters and wrote "
        + "about the sea and the ships that passed by in the night . " * 3
        for i in range(20)
    ]
)


def test_builtin_prompts_are_distinct_seeded_and_half_of_them_quote_the_text():
    prompts = builtin_prompts(40, seed=0, passages_text=TEXT)
    assert len(prompts) == len(set(prompts)) == 40
    assert prompts == builtin_prompts(40, seed=0, passages_text=TEXT)
    assert prompts != builtin_prompts(40, seed=1, passages_text=TEXT)
    quoting = [p for p in prompts if "lighthouse-keeper, who kept" in p]  # WikiText's " @-@ " and " , " undone
    assert len(quoting) == 20 and all(p.split("\n\n")[0] + "\n\n{p}" in PASSAGE_TEMPLATES for p in quoting)


def test_builtin_prompts_without_text_are_topic_instructions_and_run_out_clearly():
    assert len(builtin_prompts(100, seed=0)) == 100
    with pytest.raises(DataError, match=r"holds \d+ prompts, fewer than the \d+ asked for"):
        builtin_prompts(len(TOPIC_TEMPLATES) * len(TOPICS) + 1, seed=0)


def test_a_prompt_file_gives_one_prompt_per_non_empty_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is rain?\n\n  Name three rivers.  \nWrite a limerick.\n")
    prompts = load_prompts(str(path), "test", "text", 3, seed=0)
    assert sorted(prompts) == ["Name three rivers.", "What is rain?", "Write a limerick."]
    with pytest.raises(DataError, match=r"prompts.txt: 3 prompts, fewer than the 4 asked for"):
        load_prompts(str(path), "test", "text", 4, seed=0)


def test_a_hub_dataset_gives_prompt_strings_or_the_first_user_turn_of_chat_messages(monkeypatch):
    import datasets

    class Rows:  # what load_dataset returns, as far as the loader reads it
        column_names = ["messages", "prompt"]

        def __getitem__(self, field):
            return {
                "prompt": ["Name a fruit.", "  ", "Name a tree."],
                "messages": [
                    [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."},
                    ],
                    [{"role": "assistant", "content": "no user turn"}],
                ],
            }[field]

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: asked.append((name, split)) or Rows())
    assert sorted(load_prompts("org/chats", "train", "prompt", 2, seed=0)) == ["Name a fruit.", "Name a tree."]
    assert load_prompts("org/chats", "train", "messages", 1, seed=0) == ["Hi?"]
    assert asked == [("org/chats", "train")] * 2
    with pytest.raises(DataError, match="dataset org/chats: no prompt field 'question'; columns are"):
        load_prompts("org/chats", "train", "question", 1, seed=0)
