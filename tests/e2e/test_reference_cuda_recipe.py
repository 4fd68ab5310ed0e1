"""The shipped GPU recipe (INT4 in a float16 graph) on SmolLM2-135M-Instruct, end to end on the CPU
provider (slow tier; CI runs it). On a GPU machine `make gpu-check` runs the same artifact on CUDA."""

import json

import onnx
import pytest
from click.testing import CliRunner
from conftest import run_reference_recipe

from pipeline.cli import main
from runtime import find_model_folder
from runtime.io_spec import Contract

pytestmark = [pytest.mark.slow, pytest.mark.serial]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    return run_reference_recipe("smollm2-int4-cuda.yaml", tmp_path_factory)


def test_float16_graph_passes_the_gates_of_its_float32_twin(cuda_run):
    report = json.loads(next(cuda_run.glob("*-validate-*/report.json")).read_text())
    assert report["passed"], report["failures"]
    # over 40 windows it measures 31.5 % and the float32 INT4 RTN recipe 31.9 %; CI's first 8 windows: 33.9 %
    assert report["metrics"]["perplexity_delta_pct"] < 36
    export = find_model_folder(cuda_run)
    assert Contract.load(export / "fused").dtype == "float16"
    graph = onnx.load(str(export / "fused" / "model.onnx"), load_external_data=False)
    assert graph.ir_version == 8  # what onnxruntime-gpu releases accept
    floats = [t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert not [n for n in floats if not n.startswith("/model/rotary_tables.")]  # positions, frequencies: float32
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["parity_by_graph"]["fused"] < manifest["parity_limit_by_graph"]["fused"]


def test_float16_artifact_answers(cuda_run):
    result = CliRunner().invoke(
        main, ["generate", str(cuda_run), "What is the capital of France?", "--max-new-tokens", "24"]
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
