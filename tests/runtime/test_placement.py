"""The provider-placement check reads ONNX Runtime's real profile and names nodes that left the provider."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime import RuntimeFailure
from runtime.io_spec import Contract
from runtime.placement import check_placement, node_providers


def _profile(folder, tmp_path):
    """Run the fused graph once on the CPU with profiling on; returns the profile file."""
    contract = Contract.load(folder / "fused")
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "prof")
    session = ort.InferenceSession(str(folder / "fused" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    past = {n: np.zeros((1, contract.num_kv_heads, 4, contract.head_dim), np.float32) for n in contract.past_names()}
    session.run(
        None,
        {
            "input_ids": np.array([[1, 2]]),
            "seqlens_k": np.array([1], np.int32),
            "total_sequence_length": np.array(2, np.int32),
            "logits_positions": np.array([[1]]),
            **past,
        },
    )
    return session.end_profiling()


def test_profile_shows_every_heavy_node_on_its_provider(tiny_export, tmp_path):
    placed = node_providers(_profile(tiny_export, tmp_path))
    ops = {op for op, _ in placed.values()}
    assert {"GroupQueryAttention", "MatMul"} <= ops
    assert {where for _, where in placed.values()} == {"CPUExecutionProvider"}
    assert check_placement(_profile(tiny_export, tmp_path), "CPUExecutionProvider") == []


def test_nodes_off_the_requested_provider_fail_by_name(tiny_export, tmp_path):
    """As if CUDA had been asked for: every attention and matmul ran on the CPU instead."""
    with pytest.raises(
        RuntimeFailure, match=r"heavy nodes do not run on CUDAExecutionProvider: .*GroupQueryAttention on CPU"
    ):
        check_placement(_profile(tiny_export, tmp_path), "CUDAExecutionProvider")
    off = check_placement(_profile(tiny_export, tmp_path), "CUDAExecutionProvider", allow_fallback=True)
    assert any("MatMul on CPUExecutionProvider" in n for n in off)
