"""Sequence-level distillation data (Kim & Rush, 2016): the teacher's own answers to chat prompts.

A student trained on plain text alone learns that text's style and loses the chat turns its
teacher follows: asked a question, it echoes the prompt or continues in the corpus's style. Training
also on conversations the teacher wrote (its chat template, its answers, its end-of-turn token)
keeps that behaviour, and the KD loss on them teaches the teacher's distributions on exactly the
sequences it would produce.

    teacher ─► fused ONNX graph (float32, in a work folder) ─► our runner: batched, seeded sampling
    prompts ─► chat template ─► answers that end their turn ─► prompt + answer + end of turn
            ─► one token stream, cut into blocks like any training text

The answers come from our own runner, not `transformers.generate`: on this 2-core CPU it samples
about 3.5x faster at batch 16 (ragged batches, preallocated KV cache), and it runs on CUDA where there is a GPU.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.archs import model_dims
from pipeline.checkpoint import FloatWeights
from pipeline.configs import ExportConfig, TeacherAnswersConfig
from pipeline.errors import StageError
from pipeline.graph.fused import build_fused_graph
from pipeline.graph.lazy import save_streamed
from pipeline.graph.pack import pack_sibling_matmuls
from pipeline.models import copy_tokenizer, torch_greedy
from runtime import Generator
from runtime.generate import end_tokens, read_json
from runtime.io_spec import Contract
from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer

END_OF_TURN = "<|im_end|>"


def export_for_sampling(teacher, teacher_folder: Path, work: Path) -> Path:
    """The teacher as a float32 fused graph in `work` (a folder the runner loads); rebuilt from scratch."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "fused").mkdir(parents=True)
    dims = model_dims(teacher.config)
    contract = Contract(
        "fused",
        dims.num_layers,
        dims.num_kv_heads,
        dims.head_dim,
        dims.vocab_size,
        max_positions=teacher.config.max_position_embeddings,
    )
    weights = FloatWeights(teacher_folder)
    graph = build_fused_graph(teacher, weights, contract, ExportConfig().opset)
    pack_sibling_matmuls(graph)
    save_streamed(graph, work / "fused" / contract.model_file, weights)
    contract.save(work / "fused")
    copy_tokenizer(teacher_folder, work)
    return work


def teacher_answers(
    teacher,
    teacher_folder: Path,
    work: Path,
    prompts: list[str],
    cfg: TeacherAnswersConfig,
    seed: int,
    log: Callable[[str], None],
) -> list[dict]:
    """One record per prompt whose answer ended within `max_new_tokens`: the prompt, the answer text,
    and the conversation's token ids (chat-templated prompt, answer, end of turn, the template's newline)."""
    from tqdm import tqdm

    started = time.perf_counter()
    gen = Generator(export_for_sampling(teacher, teacher_folder, work), provider="auto", graph="fused")
    log(
        f"  teacher exported for sampling in {time.perf_counter() - started:.0f} s; answering {len(prompts)} "
        f"prompts on {gen.provider}, batches of {cfg.batch_size}"
    )
    tokenizer = gen.tokenizer
    end = tokenizer.token_id(END_OF_TURN)
    end = end if end in gen.eos_ids else min(gen.eos_ids, default=None)
    if end is None:
        raise StageError(
            f"distill.teacher_answers: {teacher_folder} names no end-of-turn token "
            f"(generation_config.json eos_token_id); the teacher's answers would never end"
        )
    records, new_tokens, started = [], 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc="  teacher answers", unit="prompt")
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        encoded = [tokenizer.encode_chat(p, cfg.system) for p in batch]
        # one seed per prompt: an answer does not depend on the batch it ran in
        params = [SamplingParams(cfg.temperature, 0, cfg.top_p, seed + start + i) for i in range(len(batch))]
        result = gen.generate(encoded, cfg.max_new_tokens, params)
        for prompt, prompt_ids, answer, reason in zip(batch, encoded, result.tokens, result.finish_reasons):
            new_tokens += len(answer)
            if reason == "stop" and answer:  # cut off by the limit, or empty: dropped
                records.append(
                    {
                        "prompt": prompt,
                        "answer": tokenizer.decode(answer),
                        "ids": conversation(tokenizer, prompt_ids, answer, end),
                    }
                )
        bar.update(len(batch))
    bar.close()
    del gen
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    log(
        f"  teacher answers: {len(records)} of {len(prompts)} ended within {cfg.max_new_tokens} tokens "
        f"({new_tokens} tokens sampled in {seconds:.0f} s, {new_tokens / max(seconds, 1e-9):.0f} tokens/s)"
    )
    if not records:
        raise StageError(
            f"distill.teacher_answers: none of the {len(prompts)} answers ended within max_new_tokens "
            f"{cfg.max_new_tokens}; raise it"
        )
    return records


def conversation(tokenizer: Tokenizer, prompt_ids: list[int], answer_ids: list[int], end: int) -> list[int]:
    """One training conversation: the chat-templated prompt, the answer, the end of its turn and the
    newline the chat template puts after a turn."""
    return prompt_ids + answer_ids + [end] + tokenizer.encode("\n", add_special_tokens=False)


def read_answers(path: Path, tokenizer: Tokenizer) -> list[dict]:
    """The records of a `teacher_answers.jsonl` a distill step wrote, so another run can train on the
    same conversations: their token ids as sampled (system prompt included), or, in files written
    before the ids were saved, rebuilt from the texts (chat template without a system prompt, the
    answer re-encoded)."""
    end = tokenizer.token_id(END_OF_TURN)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
            ids = r.get("ids") or conversation(
                tokenizer,
                tokenizer.encode_chat(r["prompt"]),
                tokenizer.encode(r["answer"], add_special_tokens=False),
                end,
            )
            if not all(isinstance(t, int) for t in ids):
                raise TypeError(f"ids must be token ids, got {ids[:3]}")
            records.append({"prompt": r["prompt"], "answer": r["answer"], "ids": ids})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StageError(
                f"{path}:{number}: not a teacher answer record ({{'prompt': ..., 'answer': ..., 'ids': [...]}}): {e}"
            ) from None
    return records


def conversations_stream(records: list[dict]) -> np.ndarray:
    return np.array([t for r in records for t in r["ids"]], dtype=np.int64)


def sample_replies(model, folder: Path, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy chat replies of a PyTorch model (the student) whose tokenizer is in `folder`: a few of
    them go in the manifest, so anyone can read what the student says."""
    tokenizer = Tokenizer(folder)
    eos_ids, pad = end_tokens(read_json(folder / "generation_config.json"))
    encoded = [tokenizer.encode_chat(prompt) for prompt in prompts]
    return [tokenizer.decode(reply) for reply, _ in torch_greedy(model, encoded, max_new_tokens, eos_ids, pad, 1)]
