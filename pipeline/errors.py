"""User-facing errors. Each message says what failed, where, and what would be right.

The CLI prints the message without a traceback and exits with `exit_code`:
2 for a bad recipe or usage, 1 for a stage that failed.
"""

from __future__ import annotations

import difflib


class PipelineError(Exception):
    exit_code = 1


class RecipeError(PipelineError):
    exit_code = 2


class ArtifactError(PipelineError):
    pass


class StageError(PipelineError):
    pass


class ValidationFailed(PipelineError):
    """Raised after every gate was checked, listing each failed metric with its value and limit."""

    def __init__(self, failures: list[str], report: str | None = None):
        self.failures = failures
        where = f" (report: {report})" if report else ""
        super().__init__(f"validation failed{where}: " + "; ".join(failures))


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
