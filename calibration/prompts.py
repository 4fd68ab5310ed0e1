"""Chat prompts for sequence-level distillation: the teacher answers them, the student learns from the turns.

A prompt source is a local text file (one prompt per line), a hub dataset (`field` holds a prompt
string or a list of chat messages, whose first user turn is taken), or, with no source, the
built-in set: instructions made from templates and topics, plus tasks on passages of the training
text (summarise, explain, continue, answer about it), so the answers also cover that text's domain.
"""

from __future__ import annotations

import re

import numpy as np

from calibration.datasets import DataError, hub_column, local_file

TOPIC_TEMPLATES = (
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Write a short poem about {t}.",
    "Give me three interesting facts about {t}.",
    "Write a short story about {t}.",
    "Why is {t} important?",
    "Describe {t} to a ten-year-old.",
    "What are the main ideas behind {t}?",
    "Write a haiku about {t}.",
    "How would you teach someone about {t}?",
    "List some advantages and disadvantages of {t}.",
    "Write a short paragraph about the history of {t}.",
    "What questions do people often ask about {t}? Answer two of them.",
    "Tell me something surprising about {t}.",
    "Write a friendly email to a friend about {t}.",
    "Summarize what you know about {t} in two sentences.",
)

TOPICS = (
    "the ocean",
    "the moon",
    "photosynthesis",
    "volcanoes",
    "friendship",
    "the Roman Empire",
    "rainbows",
    "honey bees",
    "electricity",
    "the water cycle",
    "gravity",
    "the Internet",
    "chess",
    "coffee",
    "music",
    "the human heart",
    "climate change",
    "dinosaurs",
    "the solar system",
    "bread baking",
    "democracy",
    "recycling",
    "sleep",
    "the French Revolution",
    "mountains",
    "rain forests",
    "computers",
    "birds",
    "the printing press",
    "mathematics",
    "healthy eating",
    "libraries",
    "trains",
    "the desert",
    "whales",
    "gardening",
    "time management",
    "the brain",
    "lighthouses",
    "autumn",
    "kindness",
    "the stars",
    "bicycles",
    "ancient Egypt",
    "the immune system",
    "wind energy",
    "penguins",
    "writing a good essay",
    "learning a new language",
    "the weather",
    "rivers",
    "earthquakes",
    "butterflies",
    "the Olympic Games",
    "vaccines",
    "the telephone",
    "snow",
    "a city at night",
    "running",
    "cooking pasta",
)

PASSAGE_TEMPLATES = (
    "Summarize the following text in a few sentences.\n\n{p}",
    "What is the main idea of this passage?\n\n{p}",
    "Explain the following text in simple words.\n\n{p}",
    "Continue this text with one more paragraph.\n\n{p}",
    "Write two questions about this passage and answer them.\n\n{p}",
    "Rewrite this passage so that a child could understand it.\n\n{p}",
)


def builtin_prompts(count: int, seed: int, passages_text: str | None = None) -> list[str]:
    """`count` distinct prompts, seeded: half topic instructions, half tasks on passages of `passages_text`
    (all topic instructions when no text is given)."""
    rng = np.random.default_rng(seed)
    topic = [t.format(t=topic) for t in TOPIC_TEMPLATES for topic in TOPICS]
    passages = _passages(passages_text) if passages_text else []
    tasks = [t.format(p=p) for p in passages for t in PASSAGE_TEMPLATES]
    n_tasks = min(len(tasks), count // 2)
    n_topic = min(len(topic), count - n_tasks)
    chosen = [topic[i] for i in rng.permutation(len(topic))[:n_topic]] + [
        tasks[i] for i in rng.permutation(len(tasks))[:n_tasks]
    ]
    if len(chosen) < count:
        raise DataError(
            f"the built-in prompt set holds {len(chosen)} prompts, fewer than the {count} asked for; "
            "lower samples or give a prompts source"
        )
    return [chosen[i] for i in rng.permutation(len(chosen))]


def load_prompts(
    source: str, split: str, field: str, count: int, seed: int, hub_config: str | None = None
) -> list[str]:
    """`count` prompts drawn (seeded, without repeats) from a text file or a hub dataset."""
    path = local_file(source, split)
    if path is not None:
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from e
        where = str(path)
    else:
        prompts, where = _hub_prompts(source, hub_config, split, field), f"dataset {source}"
    if len(prompts) < count:
        raise DataError(f"{where}: {len(prompts)} prompts, fewer than the {count} asked for (samples)")
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.permutation(len(prompts))[:count]]


def _hub_prompts(name: str, config: str | None, split: str, field: str) -> list[str]:
    out = []
    for value in hub_column(name, config, split, field, what="prompt"):
        if isinstance(value, list):  # chat messages: the first user turn
            value = next((m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"), None)
        if isinstance(value, str) and value.strip():
            out.append(value.strip())
    return out


def _passages(text: str, min_words: int = 40, max_words: int = 120) -> list[str]:
    """Passages of a reasonable length, WikiText's tokenization undone (" @-@ " -> "-", " , " -> ", "):
    runs of whole sentences within a paragraph, none holding WikiText's unknown-word marker, which
    would make the prompt read as garbled."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        line = re.sub(r" @(.)@ ", r"\1", line)
        line = re.sub(r" ([,.;:!?)'])", r"\1", line).replace("( ", "(")
        run: list[str] = []
        for sentence in re.split(r"(?<=[.!?]) ", line) + ["<unk>"]:  # the sentinel closes the last run
            if "<unk>" not in sentence:
                run.append(sentence)
                continue
            words = " ".join(run).split()
            if len(words) >= min_words:
                out.append(" ".join(words[:max_words]) + ("" if len(words) <= max_words else " …"))
            run = []
    return out
