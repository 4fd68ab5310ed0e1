"""The stages, in recipe order. Importing this module registers each one."""
from pipeline.stages import export, validate  # noqa: F401
