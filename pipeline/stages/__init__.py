"""The stages, in recipe order. Importing this module registers each one."""

from pipeline.stages import distill, export, quantize, validate  # recipe order  # noqa: F401
