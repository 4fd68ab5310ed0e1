"""Recipe-driven optimization pipeline: `run(recipe_path)` builds every stage's artifact.

Example:
    >>> from pipeline import run, load_recipe
    >>> recipe = load_recipe("recipes/smollm2-fp32.yaml")   # doctest: +SKIP
    >>> run(recipe.path)                                    # doctest: +SKIP
"""

from pipeline.artifacts import Artifact, load_artifact
from pipeline.errors import PipelineError, RecipeError, StageError, ValidationFailed
from pipeline.recipe import Recipe, load_recipe
from pipeline.steps import run

__all__ = [
    "Artifact",
    "PipelineError",
    "Recipe",
    "RecipeError",
    "StageError",
    "ValidationFailed",
    "load_artifact",
    "load_recipe",
    "run",
]
