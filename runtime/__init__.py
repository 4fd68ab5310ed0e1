"""The bundled ONNX Runtime runner: loads an exported artifact and generates.

Depends on onnxruntime, numpy, tokenizers and jinja2 only (no torch, no transformers); the server in
`runtime.serve` adds starlette, uvicorn and prometheus-client.
"""

from runtime.errors import RuntimeFailure
from runtime.generate import GenerationResult, Generator
from runtime.io_spec import Contract
from runtime.sampling import SamplingParams

__all__ = ["Contract", "GenerationResult", "Generator", "RuntimeFailure", "SamplingParams", "find_model_folder"]


def find_model_folder(path):
    """An export folder itself, or the newest exported step of a run folder (artifacts/<run>)."""
    import json
    from pathlib import Path

    from runtime.integrity import inside
    from runtime.io_spec import CONTRACT_FILE

    path = Path(path)
    if (path / CONTRACT_FILE).is_file():
        return path
    run = path / "run.json"
    if run.is_file():
        try:
            steps = json.loads(run.read_text()).get("steps", [])
        except (OSError, ValueError, AttributeError) as e:
            raise RuntimeFailure(
                f"{run}: unreadable ({type(e).__name__}); pass the export step folder itself"
            ) from None
        for step in reversed(steps):
            folder = inside(path, str(step.get("dir", "")), "run.json") if isinstance(step, dict) else None
            if folder is not None and (folder / CONTRACT_FILE).is_file():
                return folder
    candidates = sorted(p.parent for p in path.glob(f"*/{CONTRACT_FILE}"))
    if candidates:
        return candidates[-1]
    raise RuntimeFailure(
        f"{path}: no exported model here (no {CONTRACT_FILE}); pass a run folder or an export step folder"
    )
