"""Graph weights left in the checkpoint until the save: the saved graph holds exactly the weights an
in-memory build holds, and nothing is read before the save."""

import numpy as np
import onnx
import pytest
from conftest import make_checkpoint
from onnx import numpy_helper

from pipeline.archs import model_dims
from pipeline.checkpoint import FloatWeights, ModelWeights
from pipeline.errors import StageError
from pipeline.graph.fused import build_fused_graph, to_float16
from pipeline.graph.lazy import is_lazy, lazy_tensor, materialize, save_streamed
from pipeline.graph.pack import pack_sibling_matmuls
from pipeline.models import load_torch_model
from pipeline.streamed import load_streamed_model
from runtime.io_spec import Contract


def _contract(model, dtype="float32") -> Contract:
    d = model_dims(model.config)
    return Contract("fused", d.num_layers, d.num_kv_heads, d.head_dim, d.vocab_size, max_positions=256, dtype=dtype)


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen2", "float16")])
def test_a_streamed_save_holds_what_an_in_memory_build_holds(tmp_path, family, dtype):
    folder = make_checkpoint(tmp_path / "m", family, layers=2, dtype="bfloat16")
    whole, streamed = load_torch_model(folder), load_streamed_model(folder)
    built = []
    for model, weights in ((whole, ModelWeights(whole)), (streamed, FloatWeights(folder))):
        graph = build_fused_graph(model, weights, _contract(model, dtype), 17)
        pack_sibling_matmuls(graph)
        if dtype == "float16":
            to_float16(graph)
        built.append((graph, weights))
    lazy_graph, checkpoint = built[1]
    # per layer: packed qkv, o, packed gate/up, down, two norms (+ qwen2's three biases); embedding, final norm, head
    assert sum(is_lazy(t) for t in lazy_graph.graph.initializer) == 2 * (6 + 3 * (family == "qwen2")) + 3
    assert lazy_graph.ByteSize() < 100_000  # the embeddings alone are 6x that: nothing was read
    save_streamed(lazy_graph, tmp_path / "model.onnx", checkpoint)
    saved = onnx.load(str(tmp_path / "model.onnx"))
    expected = {t.name: numpy_helper.to_array(t) for t in materialize(built[0][0], built[0][1]).graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name


def test_large_tensors_start_aligned_so_onnx_runtime_can_map_them(tmp_path):
    weights = {"w": np.arange(2**19, dtype=np.float32).reshape(512, 1024), "b": np.ones(3, np.float32)}
    model = onnx.ModelProto()
    model.graph.initializer.append(lazy_tensor("b", [("b", False)], [3]))
    model.graph.initializer.append(lazy_tensor("w.T", [("w", True)], [1024, 512]))
    save_streamed(model, tmp_path / "g.onnx", weights)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in model.graph.initializer}
    assert offsets["w.T"] % 65536 == 0 and offsets["b"] == 0
    loaded = onnx.load(str(tmp_path / "g.onnx"))
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[1]), weights["w"].T)


def test_float16_placeholders_beyond_its_range_are_refused_when_written(tmp_path):
    model = onnx.ModelProto()
    model.graph.initializer.append(lazy_tensor("w", [("w", False)], [2]))
    assert to_float16(model) == 1
    with pytest.raises(StageError, match="w holds values beyond float16's range; use dtype: float32"):
        save_streamed(model, tmp_path / "g.onnx", {"w": np.array([1.0, 1e6], np.float32)})
    assert not list(tmp_path.iterdir())  # no half-written data file


def test_a_tensor_in_another_data_file_is_not_silently_dropped(tmp_path):
    model = onnx.ModelProto()
    t = model.graph.initializer.add()
    t.CopyFrom(numpy_helper.from_array(np.ones(1024, np.float32), "w"))
    save_streamed(model, tmp_path / "a.onnx", None)
    with pytest.raises(StageError, match="w points at another data file"):
        save_streamed(onnx.load(str(tmp_path / "a.onnx"), load_external_data=False), tmp_path / "b.onnx", None)
