"""The table of stages: recipe name -> config type, function, and the artifact kinds it links.

A stage is a plain function `(config, input_artifact, ctx) -> StageResult` that writes its files
into `ctx.out_dir`; the step loop (`pipeline/steps.py`) owns ordering, caching, manifests and atomic
placement.
Stage modules register themselves when `pipeline.stages` imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type
    fn: Callable
    consumes: str  # artifact kind taken: "hf-model" | "onnx"
    produces: str  # artifact kind written: "hf-model" | "onnx" | "report"
    distributed: bool = False  # under a launcher, runs in every process (pipeline/distributed.py), not process 0 alone


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # extra manifest fields (skipped_layers, plans…)
    passed: bool = True  # False: the artifact is kept (metrics included) but the run fails
    failures: list[str] = field(default_factory=list)


STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, config_cls: type, consumes: str, produces: str, distributed: bool = False):
    def wrap(fn: Callable) -> Callable:
        assert name not in STAGES, f"stage {name} registered twice"
        STAGES[name] = StageSpec(name, config_cls, fn, consumes, produces, distributed)
        return fn

    return wrap
