"""Errors of the runner. Kept free of the pipeline so `runtime/` stands alone."""


class RuntimeFailure(Exception):
    """A user-facing runner error: the message says what failed and what to do."""
