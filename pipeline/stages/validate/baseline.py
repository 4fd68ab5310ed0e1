"""The baseline's own answers, kept in the workdir from one run to the next.

Every recipe run on one model validates against the same baseline: the unoptimized model in float32. Its
greedy replies (to the prompts and to the chat set) and its likelihood of its own chat replies depend only
on that model, those inputs and the libraries that computed them, yet they are much of validate's PyTorch
time (68 of 168 s in SmolLM2-135M's INT4 run, and more the larger the model). So they are kept under
`<workdir>/.baseline/`, one JSON file per question, named by a hash of everything the answer depends on;
the next recipe on the same model reads them instead. The perplexity windows' baseline logits are not
kept: the KL divergence needs every logit (0.8 GB for SmolLM2's 8 CI windows).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.artifacts import fingerprint, library_versions, write_json_atomic

VERSION = 1  # raise when what is kept, or how it is computed, changes
FOLDER = ".baseline"


class BaselineMemo:
    """Answers of one baseline model (`model`: its artifact's fingerprint and how it runs), read from
    `folder` when kept there, else computed and kept."""

    def __init__(self, folder: Path, model: dict, log: Callable[[str], None], fresh: bool = False):
        self.folder, self.log, self.fresh = folder, log, fresh  # fresh (--force): compute again, then keep
        self.model = {**model, "versions": library_versions(("torch", "transformers")), "version": VERSION}

    def get(self, what: str, inputs: dict, compute: Callable[[], Any]) -> Any:
        """`compute()` (a JSON value) for `inputs`, unless an earlier run kept it."""
        key = json.loads(json.dumps({"what": what, "model": self.model, "inputs": inputs}))  # as it reads back
        path = self.folder / f"{what}-{fingerprint(key)[:16]}.json"
        kept = None if self.fresh else _read(path)
        if kept is not None and kept.get("key") == key:  # not another question under the same hash prefix
            self.log(f"  baseline {what}: kept from an earlier run ({path})")
            return kept["value"]
        value = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "value": value})
        return value


def greedy_inputs(prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int, batch: int) -> dict:
    """What `torch_greedy`'s replies depend on besides the model: the key part of a question about them."""
    return {"prompts": prompts, "max_new_tokens": max_new_tokens, "eos": sorted(eos_ids), "pad": pad_id, "batch": batch}


def _read(path: Path) -> dict | None:
    """The kept answer, or None when there is none or it is damaged (then it is computed again)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and "value" in kept else None
