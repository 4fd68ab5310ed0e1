"""The stages, in recipe order. Importing this module registers each one."""
from pipeline.stages import quantize, export, validate  # recipe order  # noqa: F401
