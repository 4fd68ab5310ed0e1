"""Recipe-driven optimization pipeline: `run(recipe_path)` builds every stage's artifact.

Example:
    >>> from pipeline import run, load_recipe
    >>> recipe = load_recipe("recipes/smollm2-fp32.yaml")   # doctest: +SKIP
    >>> run(recipe.path)                                    # doctest: +SKIP

The names below are imported on first use, so that `optimize generate` and `optimize serve` start on a
runtime-only install (no torch, no transformers) through this package's command line.
"""

from importlib import import_module

_HOMES = {
    "Artifact": "pipeline.artifacts",
    "load_artifact": "pipeline.artifacts",
    "PipelineError": "pipeline.errors",
    "RecipeError": "pipeline.errors",
    "StageError": "pipeline.errors",
    "ValidationFailed": "pipeline.errors",
    "Recipe": "pipeline.recipe",
    "load_recipe": "pipeline.recipe",
    "run": "pipeline.steps",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
