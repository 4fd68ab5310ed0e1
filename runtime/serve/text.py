"""Token ids to streamed text, cut at the request's stop strings.

Text is released only when it is final: an incomplete UTF-8 sequence waits for its next token, and
a tail that could still grow into a stop string waits until it cannot (or the sequence ends).
"""

from __future__ import annotations

from runtime.tokenizer import StreamDecoder, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.decoder, self.stop = StreamDecoder(tokenizer), tuple(s for s in stop if s)
        self.text = ""  # everything decoded so far (complete characters only)
        self.sent = 0  # characters of `text` already released
        self.stopped = False  # a stop string was found; `text` ends before it

    @property
    def output(self) -> str:
        return self.text[: self.sent]

    def push(self, token: int) -> str:
        """Add one token; returns the text now final (may be empty). Sets `stopped` on a stop string."""
        if not self.decoder.push(token):  # nothing new yet (a character cut in two, or a skipped token)
            return ""
        text = self.text = self.decoder.emitted
        if not self.stop:
            return self._release(len(text))
        longest = max(len(s) for s in self.stop)
        start = max(0, self.sent - longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.text = True, text[: min(hits)]
            return self._release(len(self.text))
        return self._release(len(text) - self._held(text))

    def flush(self) -> str:
        """The sequence ended: release what was held back."""
        return self._release(len(self.text))

    def _held(self, text: str) -> int:
        """Length of the longest tail of the unreleased text that begins some stop string."""
        tail = text[self.sent :]
        for n in range(min(len(tail), max(len(s) for s in self.stop) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        piece, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return piece
