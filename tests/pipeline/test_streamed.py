"""The streamed reference model computes what the whole model computes, holding one decoder layer at a time."""

import pytest
import torch

from pipeline.models import load_torch_model
from pipeline.streamed import load_reference_model, load_streamed_model, resident_layers
from tests.conftest import make_checkpoint


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen2", "bfloat16")])
def test_streamed_model_equals_the_whole_model(tmp_path, family, dtype):
    folder = make_checkpoint(tmp_path / "m", family, layers=3, dtype=dtype)
    ids = torch.randint(0, 100, (2, 12))
    whole, streamed = load_torch_model(folder), load_streamed_model(folder)
    with torch.no_grad():
        expected, got = whole(ids).logits, streamed(ids).logits
    assert torch.equal(expected, got)
    assert resident_layers(streamed) == []  # every layer went back to disk after the forward


def test_at_most_one_layer_is_resident_during_a_forward(tmp_path):
    model = load_streamed_model(make_checkpoint(tmp_path / "m", layers=4))
    seen = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda *_: seen.append(resident_layers(model)))
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 8)))
    assert seen == [[0], [1], [2], [3]]


def test_streamed_generate_matches(tmp_path):
    folder = make_checkpoint(tmp_path / "m", layers=2)
    ids = torch.randint(0, 100, (1, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = load_torch_model(folder).generate(ids, **kwargs)
        got = load_streamed_model(folder).generate(ids, **kwargs)
    assert torch.equal(expected, got)


def test_reference_model_streams_above_the_limit(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path / "m", layers=2)
    assert not hasattr(load_reference_model(folder), "streamed_layers")
    monkeypatch.setattr("pipeline.streamed.WHOLE_MODEL_LIMIT", 1000)
    assert load_reference_model(folder).streamed_layers == 2
