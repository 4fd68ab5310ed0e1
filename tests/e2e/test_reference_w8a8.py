"""The shipped W8A8 recipe on SmolLM2-135M-Instruct: per-token int8 activations after SmoothQuant (slow tier; CI runs it)."""

import json

import onnx
import pytest
from conftest import CI_CALIBRATION, CI_WINDOWS, run_reference_recipe

pytestmark = [pytest.mark.slow, pytest.mark.serial]


@pytest.fixture(scope="module")
def w8a8_run(tmp_path_factory):
    return run_reference_recipe("smollm2-w8a8.yaml", tmp_path_factory, (CI_WINDOWS, CI_CALIBRATION))


def test_per_token_w8a8_passes_its_gates_with_every_decoder_linear_in_int8(w8a8_run):
    report = json.loads(next(w8a8_run.glob("*-validate-*/report.json")).read_text())
    assert report["passed"], report["failures"]
    assert report["metrics"]["perplexity_delta_pct"] < 1
    quantize = json.loads(next(w8a8_run.glob("*-quantize-*/manifest.json")).read_text())
    searched = quantize["smoothquant"]
    assert len(searched) == 30 * 3  # q/k/v, gate/up and down_proj groups; o_proj not (grouped-query attention)
    assert all(r["error_vs_none"] <= 1 for r in searched.values())
    for name in ("model.onnx", "fused/model.onnx"):  # the runner and validate take the fused graph
        graph = onnx.load(str(next(w8a8_run.glob(f"*-export-*/{name}"))), load_external_data=False).graph
        assert sum(n.op_type == "MatMulInteger" for n in graph.node) == 30 * 7
    assert report["graph"] == "fused"


def test_the_compressed_tensors_checkpoint_carries_the_same_int8_codes(w8a8_run):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed: `make engines`")
    report = json.loads(next(w8a8_run.glob("*-validate-*/report.json")).read_text())
    assert report["targets"]["hf-quantized"]["validated"]
    manifest = json.loads(next(w8a8_run.glob("*-export-*/hf-quantized/manifest.json")).read_text())
    assert manifest["compression"] == "int-quantized" and manifest["vllm_compatible"]
    assert list(manifest["schemes"].values()) == [30 * 7]


@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    return run_reference_recipe("smollm2-w8a8-static.yaml", tmp_path_factory, (CI_WINDOWS, CI_CALIBRATION))


def test_static_w8a8_with_hadamard_passes_its_gate_with_every_decoder_linear_in_int8(static_run):
    report = json.loads(next(static_run.glob("*-validate-*/report.json")).read_text())
    assert report["passed"], report["failures"]
    assert report["metrics"]["perplexity_delta_pct"] < 1 and report["graph"] == "fused"
    plan = json.loads(next(static_run.glob("*-quantize-*/manifest.json")).read_text())["w8a8"]
    assert len(plan["input_scales"]) == 30 * 7 and len(plan["rotations"]) == 30
    assert all(name.endswith("mlp.down_proj") for name in plan["rotations"])
    graph = onnx.load(str(next(static_run.glob("*-export-*/fused/model.onnx"))), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 30 * 7 and ops.count("QuantizeLinear") == 30 * 4
    assert "ReduceMax" not in ops  # static: no per-token reduction at run time
