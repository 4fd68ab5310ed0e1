"""RTN tensor by tensor (never the model in memory) writes the artifact the whole-model path writes."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_GGUF, make_checkpoint
from pipeline.configs import QuantizeConfig
from pipeline.models import load_torch_model
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE
from pipeline.stages.quantize.rtn import rtn_streamed
from pipeline.stages.quantize.stage import quantize_loaded


def both_paths(src: Path, tmp: Path, **settings) -> tuple[Path, Path]:
    cfg = QuantizeConfig(method="rtn", **settings)
    whole, streamed = tmp / "whole", tmp / "streamed"
    whole.mkdir()
    streamed.mkdir()
    quantize_loaded(load_torch_model(src, attention="sdpa"), cfg, src, SimpleNamespace(out_dir=whole, log=print))
    rtn_streamed(cfg, src, streamed, print)
    return whole, streamed


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_artifact(whole: Path, streamed: Path) -> None:
    a, b = load_file(str(whole / PACKED_FILE)), load_file(str(streamed / PACKED_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same codes, scales, zero points
    a, b = checkpoint_tensors(whole), checkpoint_tensors(streamed)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((whole / PLAN_FILE).read_text()) == json.loads((streamed / PLAN_FILE).read_text())
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (whole, streamed))
    for key in ("tie_word_embeddings", "model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        assert ca.get(key) == cb.get(key), key
    assert {p.name for p in whole.iterdir()} - {"model.safetensors"} == {p.name for p in streamed.iterdir()} - {"model.safetensors"}
    # and the model loads from it as from the whole-model path's
    m = load_torch_model(streamed)
    assert all(torch.equal(p, a[n]) for n, p in m.state_dict().items() if n in a)


@pytest.mark.parametrize("family,settings", [
    ("llama", {"lm_head": "float", "embedding": "float"}),
    ("llama", {"lm_head": "int4", "embedding": "int8", "bits": 4, "group_size": 32}),
    ("qwen2", {"lm_head": "int4", "embedding": "int4", "group_size": 32}),  # tied: the embedding shares the head's codes
    ("qwen2", {"lm_head": "int8", "embedding": "float"}),  # tied, head quantized alone: untied
    ("qwen2", {"lm_head": "float", "embedding": "int4", "group_size": 32, "overrides": {"mlp\\.down_proj": 8},
               "ignore": ["layers\\.0\\.self_attn\\.o_proj"], "zero_point": "float"}),
], ids=["float-head", "head-and-own-embedding", "shared", "untied", "mixed"])
def test_streamed_rtn_equals_the_whole_model_path(tmp_path, family, settings):
    src = make_checkpoint(tmp_path / "src", family)
    assert_same_artifact(*both_paths(src, tmp_path, **settings))


def test_streamed_rtn_of_a_bf16_checkpoint_equals_the_whole_model_path(tmp_path):
    src = make_checkpoint(tmp_path / "src", "qwen2", dtype="bfloat16")
    assert_same_artifact(*both_paths(src, tmp_path, lm_head="int4", embedding="int4", group_size=32))


def test_streamed_rtn_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    """No torch model is built with weights: the checkpoint is only read tensor by tensor."""
    import pipeline.stages.quantize.rtn as rtn

    src = make_checkpoint(tmp_path / "src", "llama")
    out = tmp_path / "out"
    out.mkdir()
    held: list[int] = []
    real_getitem = rtn.CheckpointReader.__getitem__

    def reading(self, name):
        t = real_getitem(self, name)
        held.append(t.numel())
        return t

    monkeypatch.setattr(rtn.CheckpointReader, "__getitem__", reading)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("the streamed path loaded the model"))
    rtn_streamed(QuantizeConfig(method="rtn"), src, out, print)
    assert len(held) == len(checkpoint_tensors(src)) and max(held) < sum(held) / 4


@pytest.mark.slow
def test_streamed_rtn_equals_the_whole_model_path_on_the_reference_model(tmp_path):
    """SmolLM2-135M as its model step stores it: every code and every checkpoint tensor identical."""
    from pipeline.configs import ModelConfig
    from pipeline.models import import_model
    from pipeline.recipe import ModelSource

    src = tmp_path / "model"
    src.mkdir()
    import_model(ModelConfig(source=str(REFERENCE_GGUF)), ModelSource("gguf", str(REFERENCE_GGUF)), src, print)
    assert_same_artifact(*both_paths(src, tmp_path, lm_head="int4", embedding="int4", group_size=32, symmetric=False))
