"""Text sources -> one string -> fixed-length token windows or seeded samples of blocks.

A source is a built-in corpus name, a local text file, or a hub dataset id:

    wikitext-2        ../shared/data/wikitext-2/{valid,test}.txt when present, else the hub's
                      wikitext / wikitext-2-v1 (rows concatenated as they are: they end in newlines)
    tinyshakespeare   ../shared/data/tinyshakespeare/input.txt, else karpathy/tiny_shakespeare; split
                      "train" is its first 36,000 lines, "test" the last 4,000, "all" the whole text
    python-code       ../shared/data/python-code/{valid,test}.txt: modules of Python's standard library
                      (no hub copy)
    some/file.txt     a UTF-8 text file, read whole
    org/dataset       any hub dataset: `text_field` of `split`, rows joined with newlines
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A text source that cannot give text: missing, empty, or without the text field."""


@dataclass(frozen=True)
class Builtin:
    local: str  # path under the data folder, {split} filled in
    splits: tuple[str, ...]
    hub: str | None
    hub_config: str | None
    hub_splits: dict[str, str]
    lines: dict[str, slice] | None = None  # a split that is a range of the text's lines


TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")

BUILTINS = {
    "wikitext-2": Builtin(
        "wikitext-2/{split}.txt",
        ("valid", "test"),
        "wikitext",
        "wikitext-2-v1",
        {"valid": "validation", "test": "test", "train": "train"},
    ),
    "tinyshakespeare": Builtin(
        "tinyshakespeare/input.txt",
        ("all", "train", "test"),
        "karpathy/tiny_shakespeare",
        None,
        {"all": "train", "train": "train", "test": "train"},
        {"all": slice(None), "train": slice(None, 36000), "test": slice(36000, None)},
    ),
    "python-code": Builtin("python-code/{split}.txt", ("valid", "test"), None, None, {}),
}


def data_dir() -> Path | None:
    """The local corpora folder: $OPTIMIZE_DATA_DIR, else a `shared/data` beside the project."""
    if os.environ.get("OPTIMIZE_DATA_DIR"):
        return Path(os.environ["OPTIMIZE_DATA_DIR"])
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def local_file(source: str, split: str) -> Path | None:
    """The local file a source reads, or None when it comes from the hub."""
    if source in BUILTINS:
        builtin = BUILTINS[source]
        if split not in builtin.splits and split not in builtin.hub_splits:
            raise DataError(f"{source}: no split '{split}'; use one of {', '.join(builtin.splits)}")
        folder = data_dir()
        path = folder / builtin.local.format(split=split) if folder else None
        return path if path and path.is_file() else None
    if source.endswith(TEXT_SUFFIXES) or Path(source).is_file():
        path = Path(source)
        if not path.is_file():
            raise DataError(f"text file {source} not found")
        return path
    return None


def load_text(source: str, split: str = "test", hub_config: str | None = None, text_field: str = "text") -> str:
    """The whole text of a source. Raises DataError for a missing or empty source."""
    path = local_file(source, split)
    if path is not None:
        text = _read_local(path)
    elif source in BUILTINS:
        b = BUILTINS[source]
        if b.hub is None:
            raise DataError(
                f"{source}: {b.local.format(split=split)} is not in the data folder ({data_dir() or 'none found'}; "
                "set OPTIMIZE_DATA_DIR) and this corpus has no hub copy"
            )
        text = _read_hub(b.hub, b.hub_config, b.hub_splits[split], "text")
    else:
        text = _read_hub(source, hub_config, split, text_field)
    if source in BUILTINS and BUILTINS[source].lines is not None:
        text = "".join(text.splitlines(keepends=True)[BUILTINS[source].lines[split]])
    if not text.strip():
        raise DataError(f"{path or source}: the text is empty")
    return text


def _read_local(path: Path) -> str:
    """A local text file is one document: read as is (datasets' "text" loader gives the same string,
    through a cache and an Arrow table)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def hub_column(name: str, config: str | None, split: str, field: str, what: str = "text") -> list:
    """One column of a hub dataset split; DataError when the dataset or the column is missing."""
    try:
        from datasets import load_dataset
    except ModuleNotFoundError:
        raise DataError(
            f"dataset {name}: reading hub datasets needs the pipeline install (pip install 'llm-optimize[pipeline,cpu]'); "
            "or give a local text file"
        ) from None

    try:
        rows = load_dataset(name, config, split=split)
    except Exception as e:  # the hub raises many types; all mean "cannot get this dataset"
        raise DataError(f"dataset {name} ({config or 'default'}, split {split}) could not be loaded: {e}") from e
    if field not in rows.column_names:
        raise DataError(f"dataset {name}: no {what} field '{field}'; columns are {rows.column_names}")
    return rows[field]


def _read_hub(name: str, config: str | None, split: str, field: str) -> str:
    texts = hub_column(name, config, split, field)
    joiner = "" if texts and all(t.endswith("\n") or not t for t in texts[:100]) else "\n"
    return joiner.join(texts)


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    scored: int  # the last `scored` tokens of the window are predicted and counted


def windows(num_tokens: int, context_length: int, stride: int, max_windows: int) -> list[Window]:
    """Sliding windows over a token stream: each window scores the tokens no earlier window scored."""
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        if end - begin < 2 or len(out) == max_windows:
            break
        out.append(Window(begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return out


def sample_blocks(ids: np.ndarray, block_length: int, count: int, seed: int) -> np.ndarray:
    """`count` random blocks of `block_length` tokens, reproducible from `seed`: [count, block_length]."""
    if len(ids) < block_length:
        raise DataError(f"text has {len(ids)} tokens, fewer than one block of {block_length}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - block_length + 1, size=count)
    return np.stack([ids[s : s + block_length] for s in starts])


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
