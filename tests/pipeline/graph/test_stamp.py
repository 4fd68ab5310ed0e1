"""The portable graph stamped from a three-layer trace runs exactly like the trace of the whole model."""

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_checkpoint

from pipeline.archs import model_dims
from pipeline.checkpoint import FloatWeights
from pipeline.errors import StageError
from pipeline.graph.lazy import is_lazy, lazy_parts, materialize
from pipeline.graph.stamp import can_stamp, weights_by_name
from pipeline.stages import export as export_stage
from pipeline.streamed import load_streamed_model
from runtime.io_spec import Contract


def portable_contract(model) -> Contract:
    dims = model_dims(model.config)
    return Contract("portable", dims.num_layers, dims.num_kv_heads, dims.head_dim, dims.vocab_size)


def run_graph(graph, contract: Contract, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    batch, new, past = 2, 5, 3
    feeds = {
        "input_ids": rng.integers(0, contract.vocab_size, (batch, new)).astype(np.int64),
        "attention_mask": np.ones((batch, past + new), np.int64),
        "position_ids": np.tile(np.arange(past, past + new), (batch, 1)).astype(np.int64),
    }
    for name in contract.past_names():
        feeds[name] = rng.standard_normal((batch, contract.num_kv_heads, past, contract.head_dim)).astype(np.float32)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [s.name for s in contract.outputs()]
    return session.run(None, feeds)


def whole_trace(folder, contract):
    """The trace of the whole model, weights placed: what stamping must equal."""
    model = load_streamed_model(folder)
    graph = export_stage._trace_fake(model, contract, 18)
    assert weights_by_name(graph, FloatWeights(folder)) is not None
    return materialize(graph, FloatWeights(folder))


@pytest.mark.parametrize(
    "family,layers",
    [
        ("llama", 4),
        ("llama", 7),
        ("qwen2", 5),
        ("qwen3", 5),
        ("mistral", 6),
        ("granite", 5),
        ("olmo2", 5),
        ("phi3", 5),
        ("gemma", 5),
    ],
)
def test_stamped_graph_equals_the_whole_trace(tmp_path, family, layers):
    folder = make_checkpoint(tmp_path / "m", family, layers=layers)
    model = load_streamed_model(folder)
    contract = portable_contract(model)
    said: list[str] = []
    stamped = export_stage._trace(model, folder, contract, 18, said.append)
    assert any("layer stamping: traced 3 layers" in s for s in said), said  # it did not fall back
    weights = FloatWeights(folder)
    placed = [t for t in stamped.graph.initializer if is_lazy(t)]
    assert {lazy_parts(t)[0][0][0] for t in placed} == set(weights)  # every tensor, each by its name
    held = sum(t.ByteSize() for t in stamped.graph.initializer if not is_lazy(t))
    assert held < 4 * model.config.hidden_size * 4  # the trace copied no weight (constants of the code only)
    materialize(stamped, weights)
    for a, b in zip(run_graph(stamped, contract), run_graph(whole_trace(folder, contract), contract)):
        np.testing.assert_array_equal(a, b)


def test_layers_that_differ_fall_back_to_the_whole_trace(tmp_path, monkeypatch):
    """When layer 1's graph is not layer 2's (here: made so by renaming one op), nothing is stamped."""
    import pipeline.graph.stamp as stamp

    folder = make_checkpoint(tmp_path / "m", "llama", layers=5)
    model = load_streamed_model(folder)
    real = stamp._signature

    def differing(nodes, layer, *a):
        sig = real(nodes, layer, *a)
        return sig[:-1] + [("changed",)] if layer == 1 else sig

    monkeypatch.setattr(stamp, "_signature", differing)
    said: list[str] = []
    graph = export_stage._trace(model, folder, portable_contract(model), 18, said.append)
    assert any("graphs differ; tracing the whole model" in s for s in said)
    assert len([t for t in graph.graph.input if t.name.startswith("past_key_values.")]) == 10


def test_a_trace_whose_weights_are_not_the_checkpoints_is_refused(tmp_path):
    """Weights are placed by name and shape: a checkpoint of other shapes gets no placeholders, and export
    stops naming the folder rather than build a graph that reads the wrong tensors."""
    folder = make_checkpoint(tmp_path / "m", "llama", layers=4)
    other = make_checkpoint(tmp_path / "o", "llama", layers=4, settings={"intermediate_size": 96})
    model = load_streamed_model(folder)
    graph = export_stage._trace_fake(model, portable_contract(model), 18)
    assert weights_by_name(graph, FloatWeights(other)) is None
    with pytest.raises(StageError, match=r"a traced weight of .*o is named after no checkpoint tensor"):
        export_stage._trace(load_streamed_model(folder), other, portable_contract(model), 18, print)


def test_a_quantized_model_stamps_and_swaps_every_layer(tmp_path, eval_text):
    """After RTN, every stamped layer's MatMul still names its module, so MatMulNBits finds all of them."""
    from conftest import write_targets_recipe

    from pipeline import run

    src = make_checkpoint(tmp_path / "m", "llama", layers=5)
    quantize = "{method: rtn, bits: 4, group_size: 32, lm_head: int4, embedding: float}"
    run_dir = run(write_targets_recipe(tmp_path, src, eval_text, quantize, "[onnx]"), workdir=tmp_path / "a")
    import json

    manifest = json.loads((next(run_dir.glob("02-export-*")) / "manifest.json").read_text())
    assert manifest["metrics"]["block_quantized_ops"] == 5 * 7 + 1
    assert manifest["parity_by_graph"]["portable"] < 1e-3


def test_models_whose_layers_alternate_are_traced_whole():
    from transformers import AutoConfig

    from pipeline.graph.stamp import can_stamp

    config = AutoConfig.for_model(
        "qwen2", num_hidden_layers=6, use_sliding_window=True, max_window_layers=2, sliding_window=64
    )
    assert len(set(config.layer_types)) == 2 and not can_stamp(config)
    assert can_stamp(AutoConfig.for_model("qwen2", num_hidden_layers=6)) and not can_stamp(
        AutoConfig.for_model("llama", num_hidden_layers=3)
    )


def test_layers_without_rotary_among_layers_with_it_are_traced_whole():
    """SmolLM3 leaves rotary out of every n-th layer: layer 2 of a three-layer trace is no template for the
    rest, so the model is traced whole (export's parity checks then hold: tests/e2e/test_families.py)."""
    from transformers import AutoConfig

    mixed = AutoConfig.for_model("smollm3", num_hidden_layers=8, no_rope_layer_interval=4)
    uniform = AutoConfig.for_model("smollm3", num_hidden_layers=8, no_rope_layer_interval=100)
    assert not can_stamp(mixed) and can_stamp(uniform)
