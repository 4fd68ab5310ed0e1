"""The bench's work: prompts of fixed token lengths cut from the evaluation text, the same for every
engine, and a fixed number of new tokens (EOS ignored)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from calibration.datasets import load_text


@dataclass
class Workload:
    tokens: list[int]  # the evaluation text, tokenized
    prompt_lengths: tuple[int, ...] = (128, 512, 1024)
    batches: tuple[int, ...] = (1, 4, 8)
    decode_prompt: int = 128  # prompt length of the decode measurements
    new_tokens: int = 128
    long_tokens: int = 1000  # the memory-flatness generation
    warmup: int = 1
    repeats: int = 3

    def prompt(self, length: int, index: int = 0) -> list[int]:
        """The `index`-th prompt of `length` tokens: consecutive, non-overlapping slices of the text."""
        start = index * length
        if start + length > len(self.tokens):
            raise ValueError(
                f"the evaluation text has {len(self.tokens)} tokens, too few for prompt {index} of {length}"
            )
        return self.tokens[start : start + length]

    def batch(self, size: int) -> list[list[int]]:
        return [self.prompt(self.decode_prompt, i) for i in range(size)]


def make_workload(tokenizer, source: str = "wikitext-2", split: str = "test", **settings) -> Workload:
    """`tokenizer` is our runtime's (encode(text, add_special_tokens=False))."""
    text = load_text(source, split)
    return Workload(tokens=tokenizer.encode(text[:200_000], add_special_tokens=False), **settings)


def warm_up_gpu(step: Callable[[], object], seconds: float = 1.0) -> None:
    """Repeat `step` for `seconds`: an idle GPU runs at low clocks and takes a while to raise them,
    which a single warm-up prefill does not cover (time to first token is measured first)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        step()
