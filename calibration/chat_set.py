"""Chat prompts for the validate stage's chat checks: short factual questions with accepted answers, and
open instructions without one.

Perplexity on a corpus says how well a model predicts that text; a chat model is used to answer. The
built-in set is small and general on purpose: questions an instruct model of ~100M parameters
mostly answers (SmolLM2-135M-Instruct names 41 of the 60), so a student or a quantized model that
forgets facts shows it; and instructions unlike the distill stage's built-in prompts
(calibration/prompts.py), so they are held out.

A custom set is a JSONL file, one object per line: {"prompt": "...", "answers": ["...", ...]};
`answers` may be left out (an open instruction). A reply is correct when it mentions one of the answers
as a whole word or phrase, ignoring case and accents.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from calibration.datasets import DataError


@dataclass(frozen=True)
class ChatPrompt:
    prompt: str
    answers: tuple[str, ...] = ()  # empty: an open instruction, no right answer


FACTS = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("Which gas do plants take from the air to make their food?", ("carbon dioxide", "CO2")),
    ("Which gas do humans need to breathe to stay alive?", ("oxygen",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("How many sides does a triangle have?", ("three", "3")),
    ("How many minutes are in an hour?", ("sixty", "60")),
    ("At what temperature in degrees Celsius does water boil at sea level?", ("100", "one hundred")),
    ("At what temperature in degrees Celsius does water freeze?", ("0", "zero")),
    ("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who was the first president of the United States?", ("Washington",)),
    ("Who proposed the theory of evolution by natural selection?", ("Darwin",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the longest river in Africa?", ("Nile",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What is the largest animal that has ever lived?", ("blue whale",)),
    ("What is the fastest land animal?", ("cheetah",)),
    ("What is the largest hot desert in the world?", ("Sahara",)),
    ("What is the hardest natural material?", ("diamond",)),
    ("What language do most people in Brazil speak?", ("Portuguese",)),
    ("What is the currency of Japan?", ("yen",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What is the square root of 81?", ("nine", "9")),
    ("What is 12 multiplied by 12?", ("144", "one hundred forty-four", "one hundred and forty-four")),
    ("What is the opposite of hot?", ("cold",)),
    ("What color do you get when you mix blue and yellow?", ("green",)),
    ("What color is a ripe banana?", ("yellow",)),
    ("Which organ pumps blood through the human body?", ("heart",)),
    ("How many bones are in the adult human body?", ("206", "two hundred and six", "two hundred six")),
    ("What is the star at the center of our solar system called?", ("Sun",)),
    ("What is the name of the natural satellite that orbits the Earth?", ("Moon",)),
    ("Which musical instrument has 88 keys?", ("piano",)),
    ("What sweet food do bees make?", ("honey",)),
    ("What do we call water when it freezes?", ("ice",)),
    ("In which year did World War II end?", ("1945",)),
    ("What is the smallest prime number?", ("two", "2")),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("Which city is the capital of the United States?", ("Washington",)),
    ("Which element has the chemical symbol O?", ("oxygen",)),
    ("What is the largest country in the world by area?", ("Russia",)),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("What do we call the process by which plants use sunlight to make food?", ("photosynthesis",)),
    ("Who was the first person to walk on the Moon?", ("Armstrong",)),
)

INSTRUCTIONS = (
    "Give me a tip for staying focused while studying.",
    "How do I make a cup of tea?",
    "Suggest a name for a pet cat.",
    "What should I pack for a weekend trip to the beach?",
    "Write one sentence describing a sunny morning.",
    "How can I improve my handwriting?",
    "What is a good way to start a conversation with a new neighbour?",
    "Explain what a verb is.",
    "Recommend a simple breakfast.",
    "What are some ways to save water at home?",
    "Describe the color blue to someone who cannot see.",
    "Why do leaves change color in the fall?",
    "How do I thank someone politely in an email?",
    "What is the difference between a lake and a sea?",
    "Give me a short motivational quote.",
    "How should I prepare for a job interview?",
)


def builtin_chat_set() -> list[ChatPrompt]:
    return [ChatPrompt(q, a) for q, a in FACTS] + [ChatPrompt(p) for p in INSTRUCTIONS]


def load_chat_set(path: Path) -> list[ChatPrompt]:
    """A JSONL chat set; every bad line is an error naming the file and line."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f'{where}: not JSON ({e.msg}); each line is {{"prompt": ..., "answers": [...]}}') from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise DataError(f'{where}: needs a non-empty "prompt" string')
        answers = record.get("answers", [])
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f'{where}: "answers" must be a list of non-empty strings')
        unknown = set(record) - {"prompt", "answers"}
        if unknown:
            raise DataError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: prompt, answers")
        items.append(ChatPrompt(record["prompt"], tuple(answers)))
    if not items:
        raise DataError(f"{path}: no prompts")
    return items


def mentions(reply: str, answers: tuple[str, ...]) -> bool:
    """Whether `reply` names one of `answers` as a whole word or phrase (case, accents and hyphens ignored)."""
    text = _normalize(reply)
    return any(re.search(rf"(?<!\w){re.escape(_normalize(a))}(?!\w)", text) for a in answers)


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"[\s\-]+", " ", text.lower()).strip()
