"""The recipe and command-line references of docs/reference/, generated from the code they describe:
the recipe's dataclasses in pipeline/configs.py (their fields, types, defaults and comments) and the click
commands of pipeline/cli.py (their --help). `python -m benchmarks.render` writes them; the tests fail
when they are stale."""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import typing
from pathlib import Path

import click

import pipeline.configs as configs

# the sections of a recipe, in reading order: (heading, config class, where it sits in the YAML)
SECTIONS = (
    ("model", configs.ModelConfig, "model:"),
    ("distill", configs.DistillConfig, "stages: - distill:"),
    ("quantize", configs.QuantizeConfig, "stages: - quantize:"),
    ("export", configs.ExportConfig, "stages: - export:"),
    ("validate", configs.ValidateConfig, "stages: - validate:"),
)


# sections that several keys take: listed once, at the end
SHARED = {
    configs.TextSourceConfig: ("text source", "train_data, eval_data, prompts, calibration.data:"),
    configs.MixedTextSourceConfig: ("weighted text source", "calibration.data: - (a list of these)"),
}


def recipe_reference() -> str:
    source = Path(configs.__file__).read_text()
    tree = ast.parse(source)
    comments = _comments(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    lines = [
        "# Recipe reference",
        "",
        "Every key a recipe may set, with its type and default, from `pipeline/configs.py` (the one place defaults "
        "live). A recipe is `name`, `model` and a list of `stages`, each one stage name mapped to its settings; "
        "any key may be changed for one run with `--set KEY.PATH=VALUE`. Closed choices are checked when the "
        "recipe loads, and an unknown key names the closest known one. A recipe may instead be `template` (another "
        "recipe file, relative to it), `name` and `set` (a mapping of `KEY.PATH: VALUE` applied to the template); "
        "see [templates](../guides/recipes.md#templates-and-your-model).",
        "",
    ]
    seen: set[str] = set()

    def section(heading: str, cls: type, where: str) -> None:
        seen.add(cls.__name__)
        node = classes[cls.__name__]
        lines.extend([f"## {heading}", "", f"`{where}` ({cls.__name__})", ""])
        doc = ast.get_docstring(node)
        if doc:
            lines.extend([" ".join(doc.split()), ""])
        lines.extend(["| key | type | default | meaning |", "| --- | --- | --- | --- |"])
        hints = typing.get_type_hints(cls)
        nested = []
        for stmt in _fields(classes, cls):
            name = stmt.target.id
            kind = ast.get_source_segment(source, stmt.annotation)
            lines.append(
                f"| `{name}` | `{_cell(kind)}` | `{_cell(_default(source, stmt))}` | {_cell(_meaning(stmt, comments))} |"
            )
            nested += [(f"{heading}.{name}", c, f"{where} {name}:") for c in _dataclasses_in(hints[name])]
        lines.append("")
        for heading, cls, where in nested:
            if cls.__name__ not in seen and cls not in SHARED:
                section(heading, cls, where)

    for heading, cls, where in SECTIONS:
        section(heading, cls, where)
    for cls, (heading, where) in SHARED.items():
        section(heading, cls, where)
    return "\n".join(lines)


def _fields(classes: dict[str, ast.ClassDef], cls: type) -> list[ast.AnnAssign]:
    """The fields in source order, inherited ones first; `version` (part of the cache key) left out."""
    names = {f.name for f in dataclasses.fields(cls)} - {"version"}
    ordered: dict[str, ast.AnnAssign] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        for stmt in classes[base.__name__].body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                ordered[stmt.target.id] = stmt
    return [stmt for name, stmt in ordered.items() if name in names]


def _default(source: str, stmt: ast.AnnAssign) -> str:
    if stmt.value is None:
        return "required"
    value = stmt.value
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        for kw in value.keywords:
            if kw.arg == "default_factory":
                text = ast.get_source_segment(source, kw.value)
                return text[len("lambda: ") :] if text.startswith("lambda: ") else f"{text}()"
            if kw.arg == "default":
                return ast.get_source_segment(source, kw.value)
    return ast.get_source_segment(source, value)


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """Line number -> comment: comments alone on their line, and comments after code."""
    alone, trailing = {}, {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            text = tok.string.lstrip("#").strip()
            (alone if not lines[row - 1][: tok.start[1]].strip() else trailing)[row] = text
    return alone, trailing


def _meaning(stmt: ast.AnnAssign, comments: tuple[dict[int, str], dict[int, str]]) -> str:
    """The comment lines just above the field, then the comments on its own lines."""
    alone, trailing = comments
    above = []
    line = stmt.lineno - 1
    while line in alone:
        above.insert(0, alone[line])
        line -= 1
    last = stmt.end_lineno or stmt.lineno
    inline = [alone.get(n) or trailing[n] for n in range(stmt.lineno, last + 1) if n in alone or n in trailing]
    return " ".join(above + inline)


def _dataclasses_in(hint) -> list[type]:
    if dataclasses.is_dataclass(hint):
        return [hint]
    found = []
    for arg in typing.get_args(hint):
        found += _dataclasses_in(arg)
    return found


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text


def cli_reference() -> str:
    """Each command's --help, as `optimize COMMAND --help` prints it at 100 columns."""
    from pipeline.cli import main

    lines = [
        "# Command reference",
        "",
        "`optimize RECIPE.yaml` is short for `optimize run RECIPE.yaml`. Each section is the command's `--help`.",
        "",
    ]
    with click.Context(main) as ctx:
        names = main.list_commands(ctx)
        commands = {name: main.get_command(ctx, name) for name in names}
    for name in ["run", *(n for n in names if n != "run")]:
        command = commands[name]
        with click.Context(command, info_name=f"optimize {name}", terminal_width=100, max_content_width=100) as ctx:
            text = command.get_help(ctx)
        lines += [f"## optimize {name}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)
