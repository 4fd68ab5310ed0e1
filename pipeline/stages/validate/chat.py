"""The validate stage's chat checks: does the artifact still answer like its baseline?

Perplexity on a corpus and agreement on its windows measure how a model predicts text. A chat model
is used to answer, and a step can keep one and lose the other: a distilled student that beats its
teacher on WikiText-2 can stop naming Paris as the capital of France. So both models answer the chat
set (chat template applied, greedy), and three things are compared:

    chat set ─► chat template ─┬─► baseline PyTorch, greedy (batched) ─► replies ─┐
                               └─► artifact, our runner, greedy (batched) ─► replies ┴─► facts named, turns ended
    baseline replies (+ their end of turn) ─► teacher-forced through the artifact ─► reply perplexity, top-1 agreement

The last one needs no right answers: it asks how likely the artifact finds what the baseline said.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from calibration.chat_set import ChatPrompt, builtin_chat_set, load_chat_set, mentions
from calibration.datasets import DataError, local_file
from pipeline.configs import ChatEvalConfig
from pipeline.errors import StageError
from pipeline.models import torch_greedy
from pipeline.stages.validate.baseline import BaselineMemo, greedy_inputs
from runtime.errors import RuntimeFailure
from runtime.generate import Generator


def chat_checks(
    cfg: ChatEvalConfig, torch_model, gen: Generator, metrics: dict, log: Callable[[str], None], memo: BaselineMemo
) -> dict:
    """Adds the chat_* metrics (and the baseline's values) to `metrics`; returns the replies for the report.
    The baseline's side (its replies and their likelihood under it) comes from `memo` when an earlier run on
    the same model kept it."""
    started = time.perf_counter()
    items = _chat_set(cfg)
    try:
        prompts = [gen.tokenizer.encode_chat(item.prompt, cfg.system) for item in items]
    except RuntimeFailure as e:
        raise StageError(f"validate.chat: {e}; the chat checks need a chat model (drop `chat`)") from None
    if not gen.eos_ids:
        raise StageError(
            "validate.chat: the artifact names no end token (generation_config.json eos_token_id), "
            "so no reply could end its turn"
        )

    def baseline() -> dict:
        replies = torch_greedy(torch_model, prompts, cfg.max_new_tokens, gen.eos_ids, gen.pad_id, cfg.batch_size)
        nll, _, _ = score_replies(lambda seq: torch_model(torch.tensor([seq])).logits[0], prompts, replies)
        return {"replies": replies, "nll": nll}

    inputs = greedy_inputs(prompts, cfg.max_new_tokens, gen.eos_ids, gen.pad_id, cfg.batch_size)
    kept = memo.get("chat", inputs, baseline)
    base = [(reply, end) for reply, end in kept["replies"]]
    ours = []
    for start in range(0, len(prompts), cfg.batch_size):
        result = gen.generate(prompts[start : start + cfg.batch_size], cfg.max_new_tokens)
        ours += [(tokens, reason == "stop") for tokens, reason in zip(result.tokens, result.finish_reasons)]
    replies = [
        {
            "prompt": item.prompt,
            "answers": list(item.answers),
            "baseline": gen.tokenizer.decode(b),
            "onnx": gen.tokenizer.decode(o),
            "baseline_ended": end is not None,
            "onnx_ended": ended,
        }
        for item, (b, end), (o, ended) in zip(items, base, ours)
    ]
    for r in replies:
        r["baseline_correct"] = mentions(r["baseline"], r["answers"]) if r["answers"] else None
        r["onnx_correct"] = mentions(r["onnx"], r["answers"]) if r["answers"] else None
    metrics.update(_reply_counts(replies))
    metrics.update(_reply_scores(gen, prompts, base, kept["nll"]))
    log(
        f"  chat: {len(items)} prompts in {time.perf_counter() - started:.0f} s; "
        + ", ".join(f"{k.removeprefix('chat_')} {v:.3f}" for k, v in metrics.items() if k.startswith("chat_"))
    )
    return {
        "prompts": "built-in" if cfg.prompts is None else cfg.prompts.source,
        "max_new_tokens": cfg.max_new_tokens,
        "replies": replies,
    }


def _reply_counts(replies: list[dict]) -> dict[str, float]:
    facts = [r for r in replies if r["answers"]]
    counts = {}
    if facts:
        counts["chat_fact_accuracy"] = sum(r["onnx_correct"] for r in facts) / len(facts)
        counts["chat_fact_accuracy_baseline"] = sum(r["baseline_correct"] for r in facts) / len(facts)
        counts["chat_fact_accuracy_delta"] = counts["chat_fact_accuracy"] - counts["chat_fact_accuracy_baseline"]
    counts["chat_turn_end_rate"] = sum(r["onnx_ended"] for r in replies) / len(replies)
    counts["chat_turn_end_rate_baseline"] = sum(r["baseline_ended"] for r in replies) / len(replies)
    return counts


def _chat_set(cfg: ChatEvalConfig) -> list[ChatPrompt]:
    if cfg.prompts is None:
        return builtin_chat_set()
    try:
        path = local_file(cfg.prompts.source, cfg.prompts.split)
        if path is None:
            raise DataError(f"{cfg.prompts.source} is not a local file; the chat set is read from a JSONL file")
        return load_chat_set(path)
    except DataError as e:
        raise StageError(f"validate.chat.prompts: {e}") from None


def _reply_scores(
    gen: Generator, prompts: list[list[int]], replies: list[tuple[list[int], int | None]], nll_base: float
) -> dict[str, float]:
    """The baseline's replies (with the end token it chose, when it ended) teacher-forced through the artifact:
    its perplexity on those tokens next to the baseline's own (`nll_base`), and its top-1 agreement."""
    nll_ours, agree, count = score_replies(lambda seq: torch.from_numpy(gen.logits(seq)), prompts, replies)
    if not count:
        return {
            "chat_reply_perplexity": math.nan,
            "chat_reply_perplexity_baseline": math.nan,
            "chat_reply_top1_agreement": math.nan,
        }
    return {
        "chat_reply_perplexity": math.exp(nll_ours / count),
        "chat_reply_perplexity_baseline": math.exp(nll_base / count),
        "chat_reply_top1_agreement": agree / count,
    }


@torch.no_grad()
def score_replies(
    logits_of: Callable[[list[int]], torch.Tensor],
    prompts: list[list[int]],
    replies: list[tuple[list[int], int | None]],
) -> tuple[float, int, int]:
    """Replies (with the end token chosen, when one was) teacher-forced after their prompts through a
    model (`logits_of(ids)` -> logits [T, V]): their summed negative log-likelihood, the positions whose
    argmax is the reply's token, and the tokens scored."""
    nll, agree, count = 0.0, 0, 0
    for prompt, (reply, end) in zip(prompts, replies):
        target = reply + ([end] if end is not None else [])
        if not target:
            continue
        first = len(prompt) - 1  # the position whose next token is the reply's first
        log_probs = F.log_softmax(logits_of(prompt + target[:-1])[first:].double(), dim=-1)
        labels = torch.tensor(target, device=log_probs.device)
        nll -= log_probs.gather(1, labels[:, None]).sum().item()
        agree += int((log_probs.argmax(-1) == labels).sum())
        count += len(target)
    return nll, agree, count
