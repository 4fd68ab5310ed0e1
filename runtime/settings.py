"""Session settings for the runner: onnxruntime's defaults, or the ones `optimize tune` measured here.

A tuning belongs to a machine, not to the artifact (which stays as its stage wrote it, checksums and
all), so it lives in this machine's cache:

    $LLM_OPTIMIZE_TUNING_DIR, else $XDG_CACHE_HOME/llm-optimize/tuning, else ~/.cache/llm-optimize/tuning
        <artifact id>/<provider>-<graph>-<machine key>.json

The artifact id is the export's fingerprint (its manifest), so a rebuilt export with other content is
tuned afresh. The machine key hashes what the timings depend on: the CPU model and the cores this
process may use, the provider (and GPU), the onnxruntime version and the graph. Another machine, or an
upgraded onnxruntime, finds no file and runs with the defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from runtime.errors import RuntimeFailure
from runtime.machine import cpu_model, nvidia_smi, usable_cores


@dataclass(frozen=True)
class SessionSettings:
    threads: int = 0  # intra-op threads; 0: onnxruntime's choice (one per physical core)
    optimization: str = "all"  # graph optimization level: basic, extended, all

    def describe_threads(self) -> str:
        return f"{self.threads} intra-op threads" if self.threads else "onnxruntime's intra-op threads"

    def describe(self) -> str:
        return f"{self.describe_threads()}, graph optimization {self.optimization}"


def machine_facts(provider: str, flavour: str) -> dict:
    """What a tuning's timings depend on; `provider` is cpu or cuda, `flavour` the graph (fused, portable)."""
    facts = {
        "cpu": cpu_model(),
        "usable_cores": usable_cores(),
        "provider": provider,
        "onnxruntime": ort.__version__,
        "graph": flavour,
    }
    if provider == "cuda":
        facts["gpu"] = nvidia_smi("name") or "unknown"
    return facts


def tuning_dir() -> Path:
    if os.environ.get("LLM_OPTIMIZE_TUNING_DIR"):
        return Path(os.environ["LLM_OPTIMIZE_TUNING_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "llm-optimize" / "tuning"


def artifact_id(folder: Path | str) -> str:
    """The export's fingerprint from its manifest; for a folder without one, a hash of its absolute path."""
    try:
        return str(json.loads((Path(folder) / "manifest.json").read_text())["fingerprint"])[:16]
    except (OSError, ValueError, KeyError, TypeError):
        return "path-" + hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]


def tuning_path(folder: Path | str, provider: str, flavour: str) -> Path:
    facts = machine_facts(provider, flavour)
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return tuning_dir() / artifact_id(folder) / f"{provider}-{flavour}-{key}.json"


def load_tuned(folder: Path | str, provider: str, flavour: str) -> tuple[SessionSettings, Path] | None:
    """The settings `optimize tune` chose for this artifact on this machine, with their file; None if never tuned here."""
    path = tuning_path(folder, provider, flavour)
    if not path.is_file():
        return None
    try:
        chosen = json.loads(path.read_text())["chosen"]
        return SessionSettings(int(chosen["threads"]), str(chosen["optimization"])), path
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeFailure(
            f"{path}: unreadable tuning ({type(e).__name__}: {e}); delete it or run `optimize tune` again"
        ) from None
