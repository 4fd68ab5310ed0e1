"""`--set KEY.PATH=VALUE`: change a recipe for one run without editing its file.

    optimize recipes/smollm2-int4-gptq.yaml --set validate.max_windows=8 --set quantize.group_size=64

The first part of the key names a stage (`validate`, or `stages[2]` when a recipe has two stages of
one kind), `model` or `name`; the rest walks into that section, creating mappings that are absent.
The value is read as YAML (`8`, `true`, `[a, b]`, `{source: wikitext-2}`). Overrides are applied to
the parsed file before the schema checks it, so a wrong key or value fails with the usual precise error.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import RecipeError

STAGE_INDEX = re.compile(r"^stages\[(\d+)\]$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'validate.max_windows=8' -> (['validate', 'max_windows'], 8)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(f"--set {text}: expected KEY.PATH=VALUE, e.g. validate.max_windows=8")
    try:
        return parts, yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None


def apply_overrides(raw: Any, overrides: Iterable[str]) -> Any:
    """Return the parsed recipe with each override applied in order (the input is not modified)."""
    return apply_settings(raw, [(*parse_override(text), f"--set {text}") for text in overrides])


def apply_settings(raw: Any, settings: Iterable[tuple[list[str], Any, str]]) -> Any:
    """Return the parsed recipe with each (key parts, value, label for errors) set in order; a template's
    `set:` mapping and `--set` both come here."""
    raw = copy.deepcopy(raw)
    for parts, value, text in settings:
        if not isinstance(raw, dict):
            raise RecipeError(f"{text}: the recipe is not a mapping")
        container, key = _locate(raw, parts[0], text)
        for depth, part in enumerate(parts[1:], start=1):
            if container.get(key) is None:
                container[key] = {}
            container, key = container[key], part
            if not isinstance(container, dict):
                raise RecipeError(f"{text}: {'.'.join(parts[:depth])} is {container!r}, not a mapping")
        container[key] = value
    return raw


def _locate(raw: dict, head: str, text: str) -> tuple[dict, str]:
    """Where the first key part lives: (the recipe, 'name' | 'model') or (one stage's entry, its stage name)."""
    if head in ("name", "model"):
        return raw, head
    stages = raw.get("stages")
    if not isinstance(stages, list):
        raise RecipeError(f"{text}: the recipe has no stages list to apply it to")
    names = [next(iter(s)) if isinstance(s, dict) and len(s) == 1 else None for s in stages]
    match = STAGE_INDEX.match(head)
    if match:
        index = int(match.group(1))
        if index >= len(stages) or names[index] is None:
            raise RecipeError(f"{text}: stages[{index}] does not exist (the recipe has {len(stages)} stages)")
        return stages[index], names[index]
    found = [i for i, n in enumerate(names) if n == head]
    if not found:
        listed = ", ".join(n for n in names if n) or "none"
        raise RecipeError(
            f"{text}: the recipe has no '{head}' stage (stages: {listed}; or name a top-level key: name, model)"
        )
    if len(found) > 1:
        raise RecipeError(
            f"{text}: the recipe has {len(found)} '{head}' stages; say which, e.g. "
            f"stages[{found[0]}].{text.partition('.')[2] or '…'}"
        )
    return stages[found[0]], head


def model_overrides(source: str, recipe_path: str | Path) -> list[str]:
    """`optimize RECIPE --model SOURCE` as --set settings: the model source (a local path made absolute, since the
    user typed it relative to where they are, not to the recipe) and a run name from the model's and the recipe's
    names, so runs of one recipe on several models do not share a folder. A later `--set name=…` wins."""
    local = Path(source).expanduser()
    value = str(local.resolve()) if local.exists() else source
    return [f"model.source={json.dumps(value)}", f"name={json.dumps(run_name(source, recipe_path))}"]


def run_name(source: str, recipe_path: str | Path) -> str:
    """`<model>-<recipe>`: the run folder's name for a recipe that gives none (a GGUF file's stem, a checkpoint
    folder's name, a hub id's last part)."""
    local = Path(source).expanduser()
    if local.exists():
        model = local.stem if local.suffix == ".gguf" else local.resolve().name
    else:
        model = source.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^\w.-]+", "-", f"{model}-{Path(recipe_path).stem}").lstrip(".-_") or "run"
