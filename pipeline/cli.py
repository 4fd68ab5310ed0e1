"""`optimize RECIPE` runs a recipe; `optimize plan|generate|tune|bench|serve|runs|show|doctor` are subcommands of the same
command; `optimize --version` says which release this is.

Exit codes: 0 success, 1 a stage or a validation gate failed, 2 a bad recipe or usage.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from importlib import import_module

import click

# subcommands defined in other modules, imported when named: a runtime-only install (no torch) still
# runs generate and serve, and the others say what they need
SUBCOMMANDS = {
    "plan": "pipeline.plan:plan_command",
    "generate": "runtime.cli:generate_command",
    "tune": "runtime.cli:tune_command",
    "serve": "runtime.serve.cli:serve_command",
    "bench": "pipeline.bench.cli:bench_command",
    "runs": "pipeline.runs:runs_command",
    "show": "pipeline.runs:show_command",
    "doctor": "pipeline.doctor:doctor_command",
}


# the libraries whose notices (deprecations, tokenizer "legacy" notes, tracer warnings) say nothing to a user
QUIET_LIBRARIES = r"(transformers|torch|onnx|onnxruntime|onnxscript|accelerate|datasets|huggingface_hub|gguf)(\.|$)"


def quiet_libraries() -> None:
    """Keep library notices out of a run's log (`--debug` shows them); the environment variable carries the
    setting to launcher-started processes."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module=QUIET_LIBRARIES)
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


def missing_install(error: ModuleNotFoundError) -> str:
    """What to install for a module this install lacks."""
    package = (error.name or "?").split(".")[0]
    if package == "onnxruntime":
        return "no onnxruntime: pip install 'llm-optimize[cpu]' (or 'llm-optimize[cuda]' on a CUDA machine)"
    return f"needs {package}, which the runtime-only install leaves out: pip install 'llm-optimize[pipeline,cpu]'"


def unavailable(name: str, reason: str) -> click.Command:
    def refuse(**_):
        click.echo(f"error: optimize {name}: {reason}", err=True)
        sys.exit(2)

    return click.Command(
        name,
        callback=refuse,
        help=f"(unavailable: {reason})",
        context_settings={"ignore_unknown_options": True},
        params=[click.Argument(["args"], nargs=-1, required=False)],
    )


class RecipeOrCommand(click.Group):
    """`optimize path/to/recipe.yaml` runs the recipe; any known word is a subcommand."""

    def list_commands(self, ctx):
        return sorted({*self.commands, *SUBCOMMANDS})

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return super().get_command(ctx, name)
        module, attribute = SUBCOMMANDS[name].split(":")
        try:
            return getattr(import_module(module), attribute)
        except ModuleNotFoundError as e:
            return unavailable(name, missing_install(e))

    def parse_args(self, ctx, args):
        if args and args[0] not in self.list_commands(ctx) and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=RecipeOrCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llm-optimize", prog_name="optimize")
def main():
    """Optimize and export language models. `optimize RECIPE.yaml` runs a recipe."""


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=str))
@click.option("--workdir", default="artifacts", show_default=True, help="where run folders are written")
@click.option("--force", is_flag=True, help="rebuild every stage even if its artifact is cached")
@click.option(
    "--verify",
    is_flag=True,
    help="hash every file of the cached artifacts and sources again, not only "
    "those whose size or modification time changed",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="change one recipe setting for this run, e.g. --set validate.max_windows=8 (repeatable)",
)
@click.option(
    "--model",
    "model_source",
    default=None,
    metavar="SOURCE",
    help="run the recipe on this model: a hub id, a local checkpoint folder or a .gguf file; the run is "
    "named <model>-<recipe> unless --set name=... (without it: the recipe's own model)",
)
@click.option("--debug", is_flag=True, help="show tracebacks and the libraries' own notices")
def run_command(recipe, workdir, force, overrides, debug, verify, model_source):
    """Run RECIPE (a YAML file): each stage writes artifacts/<run>/<NN>-<stage>-<fp>/."""
    if not debug:
        quiet_libraries()
    try:
        from pipeline import distributed
        from pipeline.errors import PipelineError
        from pipeline.recipe_overrides import model_overrides
        from pipeline.steps import run
    except ModuleNotFoundError as e:
        click.echo(f"error: optimize {recipe}: {missing_install(e)}", err=True)
        sys.exit(2)

    if model_source is not None:
        overrides = (*model_overrides(model_source, recipe), *overrides)
    try:
        run_dir = run(recipe, workdir=workdir, force=force, overrides=overrides, verify=verify)
    except PipelineError as e:
        if debug:
            traceback.print_exc()
        if distributed.is_main():  # under a launcher process 0 speaks: the others stop on the same error
            click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    if distributed.is_main():
        click.echo(f'done: {run_dir} (try: optimize generate {run_dir} "What is the capital of France?")')


if __name__ == "__main__":
    main()
