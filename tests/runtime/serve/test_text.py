"""TextStream: what is released when, around stop strings and split UTF-8 characters."""

from runtime.serve.text import TextStream


class CharTokenizer:
    """Token id = one byte of UTF-8; decode like a byte-level BPE (U+FFFD for a cut character)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(stream, text):
    return [stream.push(b) for b in text.encode()]


def test_without_stop_strings_every_token_is_released_at_once():
    stream = TextStream(CharTokenizer())
    assert feed(stream, "abc") == ["a", "b", "c"]
    assert stream.output == "abc" and not stream.stopped


def test_a_split_character_waits_for_its_last_byte():
    stream = TextStream(CharTokenizer())
    assert feed(stream, "é!") == ["", "é", "!"]


def test_text_stops_before_the_stop_string_and_a_possible_start_is_held():
    stream = TextStream(CharTokenizer(), stop=("END", "\n\n"))
    pieces = feed(stream, "ab EN")
    assert "".join(pieces) == "ab " and not stream.stopped  # "EN" may become "END"
    assert stream.push(ord("D")) == "" and stream.stopped
    assert stream.output == "ab "


def test_a_held_tail_that_does_not_become_a_stop_is_released():
    stream = TextStream(CharTokenizer(), stop=("END",))
    assert "".join(feed(stream, "ENx")) == "ENx"
    assert "".join(feed(stream, "E")) == "" and stream.flush() == "E"
    assert stream.output == "ENxE"


def test_the_earliest_of_several_stop_strings_wins():
    stream = TextStream(CharTokenizer(), stop=("cd", "b"))
    feed(stream, "abcd")
    assert stream.stopped and stream.output == "a"
