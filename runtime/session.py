"""Builds the ONNX Runtime session for an artifact and proves which provider runs it.

`provider="auto"` takes CUDA when onnxruntime offers it, else CPU. A provider asked for by name
that is missing, or that onnxruntime silently replaced, is an error, not a warning.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnxruntime as ort

from runtime.errors import RuntimeFailure
from runtime.io_spec import Contract

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
OPTIMIZATION_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def choose_provider(requested: str = "auto") -> str:
    available = ort.get_available_providers()
    if requested == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if requested not in PROVIDERS:
        raise RuntimeFailure(f"provider '{requested}' is not one of auto, cpu, cuda")
    if PROVIDERS[requested] not in available:
        hint = " (install onnxruntime-gpu: `make install-cuda`)" if requested == "cuda" else ""
        raise RuntimeFailure(f"provider {requested} requested but onnxruntime offers only {available}{hint}")
    return requested


def create_session(
    folder: Path,
    contract: Contract,
    provider: str = "auto",
    threads: int = 0,
    cuda_graph: bool = False,
    spinning: bool = True,
    profile_placement: bool = True,
    optimization: str = "all",
    model_file: str | None = None,
) -> tuple[ort.InferenceSession, str]:
    """Open `folder/model.onnx` (or `model_file`) on the chosen provider; returns (session, provider name in use).
    `threads`: intra-op threads (0: onnxruntime's choice, one per physical core); `optimization`: the
    graph optimization level (basic, extended, all). `optimize tune` picks both by measurement.
    `cuda_graph`: let ONNX Runtime capture and replay CUDA graphs (runs that name a gpu_graph_id).
    `spinning=False`: idle intra-op threads sleep instead of spinning, leaving the cores to other
    threads of the process (a server's HTTP side).
    `profile_placement`: off the CPU, profile until the caller's first `end_profiling()`, whose
    profile says where each node ran (runtime.placement)."""
    chosen = choose_provider(provider)
    if cuda_graph and chosen != "cuda":
        raise RuntimeFailure(f"cuda_graph needs the cuda provider, not {chosen}")
    if optimization not in OPTIMIZATION_LEVELS:
        raise RuntimeFailure(f"graph optimization '{optimization}' is not one of {', '.join(OPTIMIZATION_LEVELS)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if chosen != "cpu" and profile_placement:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"ort-placement-{os.getpid()}")
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model_file = model_file or contract.model_file
    path = Path(folder) / model_file
    if not path.is_file():
        raise RuntimeFailure(f"{folder}: {model_file} not found")
    providers: list = [PROVIDERS[chosen]] + ([PROVIDERS["cpu"]] if chosen != "cpu" else [])
    if cuda_graph:
        providers[0] = (PROVIDERS["cuda"], {"enable_cuda_graph": "1"})
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/RuntimeException types
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RuntimeFailure(
            f"{path}: onnxruntime cannot load it ({first}); the artifact may be damaged: check it with "
            "--verify, or rebuild it (optimize RECIPE --force)"
        ) from None
    in_use = session.get_providers()[0]
    if in_use != PROVIDERS[chosen]:
        raise RuntimeFailure(f"requested {PROVIDERS[chosen]} but onnxruntime runs the model on {in_use}")
    check_graph(session, contract)
    return session, in_use


def check_graph(session: ort.InferenceSession, contract: Contract) -> None:
    """The graph's inputs and outputs must be exactly those the contract declares."""
    have_in = [i.name for i in session.get_inputs()]
    have_out = [o.name for o in session.get_outputs()]
    want_in = [s.name for s in contract.inputs()]
    want_out = [s.name for s in contract.outputs()]
    if sorted(have_in) != sorted(want_in) or sorted(have_out) != sorted(want_out):
        missing = sorted(set(want_in + want_out) - set(have_in + have_out))
        extra = sorted(set(have_in + have_out) - set(want_in + want_out))
        raise RuntimeFailure(f"graph does not match io_contract.json: missing {missing[:4]}, unexpected {extra[:4]}")
