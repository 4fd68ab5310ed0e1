"""The teacher's answers (sequence-level KD data), from our runner on a fused export of the teacher:
chat turns that end with the end-of-turn token, the same whatever the batch, cut-off answers dropped."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_checkpoint
from transformers import AutoModelForCausalLM

from pipeline import StageError
from pipeline.configs import TeacherAnswersConfig
from pipeline.distill.teacher_answers import conversations_stream, read_answers, teacher_answers
from runtime.tokenizer import Tokenizer

PROMPTS = [f"Tell me about the number {i}." for i in range(16)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("teacher"), "llama", layers=2)
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_answers_are_whole_chat_turns_and_do_not_depend_on_the_batch(tmp_path, teacher):
    folder, model = teacher
    cfg = TeacherAnswersConfig(samples=16, max_new_tokens=120, temperature=1.5, batch_size=5)
    small = teacher_answers(model, folder, tmp_path / "a", PROMPTS, cfg, seed=0, log=print)
    whole = teacher_answers(
        model,
        folder,
        tmp_path / "b",
        PROMPTS,
        TeacherAnswersConfig(samples=16, max_new_tokens=120, temperature=1.5, batch_size=16),
        seed=0,
        log=print,
    )
    assert small == whole  # one seed per prompt
    assert 0 < len(small) < len(PROMPTS)  # random weights: some answers end, the rest hit the limit and go
    tok = Tokenizer(folder)
    end, newline = tok.token_id("<|im_end|>"), tok.encode("\n", add_special_tokens=False)
    for record in small:
        prompt = tok.encode_chat(record["prompt"])
        answer = record["ids"][len(prompt) :]
        assert record["ids"][: len(prompt)] == prompt
        assert answer[-1 - len(newline) :] == [end] + newline and end not in answer[: -1 - len(newline)]
        assert tok.decode(answer[: -1 - len(newline)]) == record["answer"]
    assert len(conversations_stream(small)) == sum(len(r["ids"]) for r in small)
    assert not (tmp_path / "a").exists()  # the sampling export goes once the answers are in


def test_no_answer_within_the_limit_is_an_error_naming_the_key(tmp_path, teacher):
    folder, model = teacher
    cfg = TeacherAnswersConfig(samples=2, max_new_tokens=1, temperature=1.0, batch_size=2)
    with pytest.raises(
        StageError, match="distill.teacher_answers: none of the 2 answers ended within max_new_tokens 1"
    ):
        teacher_answers(model, folder, tmp_path / "a", PROMPTS[:2], cfg, seed=0, log=print)


def test_saved_answers_give_back_the_sampled_conversations_system_prompt_included(tmp_path, teacher):
    """The distill step saves each conversation's ids: another run trains on exactly those tokens,
    even where a system prompt shaped them (the texts alone do not say which)."""
    folder, model = teacher
    cfg = TeacherAnswersConfig(samples=8, max_new_tokens=120, temperature=1.5, batch_size=8, system="Answer briefly.")
    records = teacher_answers(model, folder, tmp_path / "a", PROMPTS[:8], cfg, seed=0, log=print)
    tok = Tokenizer(folder)
    assert records and all(r["ids"][: len(p)] == p for r in records for p in [tok.encode_chat(r["prompt"], cfg.system)])
    path = tmp_path / "teacher_answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # as the distill stage writes it
    assert read_answers(path, tok) == records
    path.write_text(json.dumps({**records[0], "ids": ["a"]}) + "\n")
    with pytest.raises(StageError, match=r"teacher_answers.jsonl:1: not a teacher answer record"):
        read_answers(path, tok)


def test_an_answers_file_without_ids_is_rebuilt_from_its_texts(tmp_path, teacher):
    """read_answers on a file written before the ids were saved: the conversations are re-encoded."""
    folder, _ = teacher
    tok = Tokenizer(folder)
    saved = [{"prompt": "Name a colour.", "answer": "Blue, like the sea."}, {"prompt": "Hi", "answer": "Hello!"}]
    path = tmp_path / "teacher_answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in saved))
    records = read_answers(path, tok)
    end, newline = tok.token_id("<|im_end|>"), tok.encode("\n", add_special_tokens=False)
    assert [(r["prompt"], r["answer"]) for r in records] == [(r["prompt"], r["answer"]) for r in saved]
    for r in records:
        prompt = tok.encode_chat(r["prompt"])
        assert r["ids"][: len(prompt)] == prompt and r["ids"][-1 - len(newline) :] == [end] + newline
        assert tok.decode(r["ids"][len(prompt) : -1 - len(newline)]) == r["answer"]
    path.write_text(json.dumps(saved[0]) + "\n" + json.dumps({"prompt": "no answer"}) + "\n")
    with pytest.raises(StageError, match=r"teacher_answers.jsonl:2: not a teacher answer record"):
        read_answers(path, tok)
