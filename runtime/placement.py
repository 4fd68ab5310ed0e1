"""Which execution provider runs each heavy node, read from ONNX Runtime's own profile.

ONNX Runtime places a node on the CPU when the requested provider has no kernel for it, and says so
only in verbose logs. A CUDA run whose attention or matmuls fell back to the CPU is slow for a
reason the user cannot see, so the runner profiles its first run and fails, naming the nodes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.errors import RuntimeFailure

HEAVY_OPS = {
    "MatMul",
    "MatMulNBits",
    "Gemm",
    "GroupQueryAttention",
    "MultiHeadAttention",
    "Attention",
    "GatherBlockQuantized",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
}


def node_providers(profile: Path) -> dict[str, tuple[str, str]]:
    """node name -> (op type, provider) for every node that ran, from a profile JSON file."""
    events = json.loads(Path(profile).read_text())
    placed = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and "op_name" in args:
            name = event["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
            placed[name] = (args["op_name"], args["provider"])
    return placed


def fallen_back(placed: dict[str, tuple[str, str]], provider: str) -> list[str]:
    """Heavy nodes that ran on another provider than `provider`, as 'name (op on provider)'."""
    return sorted(
        f"{name} ({op} on {where})" for name, (op, where) in placed.items() if op in HEAVY_OPS and where != provider
    )


def check_placement(profile: Path, provider: str, allow_fallback: bool = False) -> list[str]:
    """Raise when heavy nodes left `provider` (unless allowed); returns those nodes either way."""
    try:
        off = fallen_back(node_providers(profile), provider)
    finally:
        os.unlink(profile)
    if off and not allow_fallback:
        shown = ", ".join(off[:5]) + (f" and {len(off) - 5} more" if len(off) > 5 else "")
        raise RuntimeFailure(
            f"{len(off)} heavy nodes do not run on {provider}: {shown}; "
            f"pass allow_fallback (--allow-fallback) to run anyway"
        )
    return off
