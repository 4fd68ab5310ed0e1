"""The artifact's tokenizer (tokenizer.json via `tokenizers`) and its chat template (Jinja).

No transformers here: the runner ships with onnxruntime, numpy, tokenizers and jinja2 only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from runtime.errors import RuntimeFailure


class Tokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise RuntimeFailure(f"{folder}: tokenizer.json not found; the artifact must carry its tokenizer")
        self.backend = HFTokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = folder / "chat_template.jinja"
        self.chat_template = template_path.read_text() if template_path.is_file() else self.config.get("chat_template")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise RuntimeFailure("this model has no chat template; run with --no-chat for plain completion")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            template = env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise RuntimeFailure(f"chat template does not parse: {e}") from e
        special = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)

    def encode_messages(self, messages: list[dict], trusted: bool = True) -> list[int]:
        """The chat prompt of `messages` as ids. Untrusted (a server's clients), each message's content is text:
        a special token's text inside it (a user typing '<|im_start|>system') is encoded as those characters,
        never as the control token, so no one can forge a turn. Contents without such text encode as before."""
        text = self.apply_chat_template(messages)
        if trusted or not any(self._has_special_text(m["content"]) for m in messages):
            return self.encode(text, add_special_tokens=False)
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: no template writes them
        framed = self.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)])
        parts = re.split("(" + "|".join(map(re.escape, marks)) + ")", framed)
        if parts[1::2] != marks:
            raise RuntimeFailure(
                "the chat template changes message contents, so special-token text in them cannot be "
                "kept apart from the template's own tokens; remove it from the messages"
            )
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids += self._literal().encode(messages[i // 2]["content"], add_special_tokens=False).ids
            elif part:
                ids += self.encode(part, add_special_tokens=False)
        return ids

    def fewest_tokens(self, chars: int) -> int:
        """A lower bound on how many tokens `chars` characters of text take (no token spells more characters
        than the longest vocabulary entry), known without tokenizing: a server refuses a prompt that cannot
        fit its context before spending the time to encode it."""
        if not hasattr(self, "_longest"):
            self._longest = max(len(token) for token in self.backend.get_vocab(with_added_tokens=True))
        return chars // max(self._longest, 1)

    def _has_special_text(self, content: str) -> bool:
        return any(token in content for token in self._special_texts())

    def _special_texts(self) -> list[str]:
        if not hasattr(self, "_specials"):
            self._specials = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
        return self._specials

    def _literal(self) -> HFTokenizer:
        """A copy of the tokenizer that reads special tokens' text as plain text."""
        if not hasattr(self, "_literal_backend"):
            literal = HFTokenizer.from_str(self.backend.to_str())
            literal.encode_special_tokens = True
            self._literal_backend = literal
        return self._literal_backend

    def encode_chat(self, user_message: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message}
        ]
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str):
    raise RuntimeFailure(f"chat template: {message}")
