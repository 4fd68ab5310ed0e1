"""The streaming quantize paths (RTN tensor by tensor, GPTQ and AWQ layer by layer; never the model in memory)
write the artifact that quantizing the loaded model writes."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE_GGUF, make_checkpoint
from safetensors.torch import load_file, save_file

from calibration.batches import calibration_batches
from calibration.collect import capture_layer_inputs, run_layer
from pipeline.configs import AwqConfig, CalibrationConfig, GptqConfig, QuantizeConfig, TextSourceConfig
from pipeline.models import copy_tokenizer, load_torch_model
from pipeline.quant.plan import PACKED_FILE, PLAN_FILE
from pipeline.quant.primitives import dequantize, pack_matmul_nbits, quantize
from pipeline.stages.quantize.awq import awq_head, awq_layer
from pipeline.stages.quantize.gptq import gptq_head, gptq_layer
from pipeline.stages.quantize.layerwise import quantize_layerwise
from pipeline.stages.quantize.output import skeleton
from pipeline.stages.quantize.plan import EMBEDDING, embedding_scheme, embedding_shares_head, make_plan, plan_file
from pipeline.stages.quantize.rtn import rtn_streamed

SMALL_CALIBRATION = CalibrationConfig(
    TextSourceConfig("wikitext-2", "valid"), num_samples=8, sequence_length=64, batch_size=4
)


def quantize_whole(cfg: QuantizeConfig, src: Path, out: Path) -> None:
    """The reference: the float32 model loaded whole, each layer quantized in place, `save_pretrained`."""
    model = load_torch_model(src, attention="sdpa")
    plan, skipped = make_plan(model, cfg)
    share = embedding_shares_head(model, cfg)
    qtensors = {}
    if cfg.method == "rtn":
        qtensors = {name: quantize(model.get_submodule(name).weight.data, scheme) for name, scheme in plan.items()}
    else:
        hidden, kwargs = capture_layer_inputs(model, calibration_batches(cfg.calibration, src, "calibration"))
        gen = torch.Generator().manual_seed(cfg.calibration.seed)
        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}."
            found = (
                gptq_layer(layer, prefix, plan, cfg, hidden, kwargs)
                if cfg.method == "gptq"
                else awq_layer(layer, prefix, index, plan, cfg, hidden, kwargs, gen)
            )
            for name, qt in found.items():
                model.get_submodule(name).weight.data = dequantize(qt)
            qtensors.update(found)
            hidden = run_layer(layer, hidden, kwargs)
        if "lm_head" in plan:
            head = gptq_head if cfg.method == "gptq" else lambda *a: awq_head(*a, gen)
            qtensors["lm_head"] = head(model.model.norm, model.lm_head.weight.data, plan["lm_head"], cfg, hidden)
    if "lm_head" in plan and model.config.tie_word_embeddings and not share:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    embed, scheme = None, embedding_scheme(model, cfg)
    if scheme is None:
        skipped[EMBEDDING] = "embedding: float (recipe)"
    else:
        embed = {"shared_with": "lm_head" if share else None}
        if not share:
            qtensors[EMBEDDING] = quantize(model.get_submodule(EMBEDDING).weight.data, scheme)
    for name, qt in qtensors.items():
        model.get_submodule(name).weight.data = dequantize(qt)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(src, out)
    save_file(
        {f"{n}.{k}": torch.from_numpy(a) for n, qt in qtensors.items() for k, a in pack_matmul_nbits(qt).items()},
        str(out / PACKED_FILE),
    )
    (out / PLAN_FILE).write_text(
        plan_file(cfg.method, {n: (qt.scheme, *qt.shape) for n, qt in qtensors.items()}, embed, skipped)
    )


def quantize_streamed(cfg: QuantizeConfig, src: Path, out: Path) -> None:
    plan, skipped = make_plan(skeleton(src), cfg)
    (rtn_streamed if cfg.method == "rtn" else quantize_layerwise)(cfg, src, out, plan, skipped, print)


def both_paths(src: Path, tmp: Path, **settings) -> tuple[Path, Path]:
    settings.setdefault("method", "rtn")
    if settings["method"] != "rtn":
        settings.setdefault("calibration", SMALL_CALIBRATION)
    cfg = QuantizeConfig(**settings)
    whole, streamed = tmp / "whole", tmp / "streamed"
    whole.mkdir()
    streamed.mkdir()
    quantize_whole(cfg, src, whole)
    quantize_streamed(cfg, src, streamed)
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
    assert {p.name for p in whole.iterdir()} - {"model.safetensors"} == {p.name for p in streamed.iterdir()} - {
        "model.safetensors"
    }
    # and the model loads from it as from the whole-model path's
    m = load_torch_model(streamed)
    assert all(torch.equal(p, a[n]) for n, p in m.state_dict().items() if n in a)


@pytest.mark.parametrize(
    "family,settings",
    [
        ("llama", {"lm_head": "float", "embedding": "float"}),
        ("llama", {"lm_head": "int4", "embedding": "int8", "bits": 4, "group_size": 32}),
        (
            "qwen2",
            {"lm_head": "int4", "embedding": "int4", "group_size": 32},
        ),  # tied: the embedding shares the head's codes
        ("qwen2", {"lm_head": "int8", "embedding": "float"}),  # tied, head quantized alone: untied
        (
            "qwen2",
            {
                "lm_head": "float",
                "embedding": "int4",
                "group_size": 32,
                "overrides": {"mlp\\.down_proj": 8},
                "ignore": ["layers\\.0\\.self_attn\\.o_proj"],
                "zero_point": "float",
            },
        ),
    ],
    ids=["float-head", "head-and-own-embedding", "shared", "untied", "mixed"],
)
def test_streamed_rtn_equals_the_whole_model_path(tmp_path, family, settings):
    src = make_checkpoint(tmp_path / "src", family)
    assert_same_artifact(*both_paths(src, tmp_path, **settings))


def test_streamed_rtn_of_a_bf16_checkpoint_equals_the_whole_model_path(tmp_path):
    src = make_checkpoint(tmp_path / "src", "qwen2", dtype="bfloat16")
    assert_same_artifact(*both_paths(src, tmp_path, lm_head="int4", embedding="int4", group_size=32))


@pytest.mark.parametrize(
    "family,settings",
    [
        ("llama", {"method": "gptq", "lm_head": "float", "embedding": "float"}),
        ("qwen2", {"method": "gptq", "lm_head": "int4", "embedding": "int4", "group_size": 32}),  # shared codes
        (
            "qwen2",
            {
                "method": "gptq",
                "lm_head": "int8",
                "embedding": "float",
                "gptq": GptqConfig(act_order=False),
                "refit_scales": False,
            },
        ),
        ("llama", {"method": "awq", "lm_head": "int4", "embedding": "int8", "group_size": 32}),
        (
            "qwen2",
            {
                "method": "awq",
                "awq": AwqConfig(codes="gptq"),
                "lm_head": "int4",
                "embedding": "int4",
                "group_size": 32,
                "zero_point": "float",
                "overrides": {"mlp\\.down_proj": 8},
            },
        ),
    ],
    ids=["gptq-float-head", "gptq-shared", "gptq-untied", "awq-own-embedding", "awq-gptq-mixed"],
)
def test_layerwise_calibration_equals_the_whole_model_path(tmp_path, family, settings):
    src = make_checkpoint(tmp_path / "src", family, layers=3)
    assert_same_artifact(*both_paths(src, tmp_path, **settings))


def test_layerwise_gptq_of_a_bf16_checkpoint_equals_the_whole_model_path(tmp_path):
    src = make_checkpoint(tmp_path / "src", "qwen2", dtype="bfloat16")
    assert_same_artifact(*both_paths(src, tmp_path, method="gptq", lm_head="int4", embedding="int4", group_size=32))


def test_layerwise_calibration_holds_one_decoder_layer_at_a_time(tmp_path, monkeypatch):
    import pipeline.stages.quantize.layerwise as layerwise
    from pipeline.streamed import resident_layers

    src = make_checkpoint(tmp_path / "src", "llama", layers=4)
    out = tmp_path / "out"
    out.mkdir()
    seen: list[list[int]] = []
    real_run = layerwise.run_layer

    def run(layer, hidden, kwargs):
        seen.append(resident_layers(model_of[0]))
        return real_run(layer, hidden, kwargs)

    model_of = []
    real_load = layerwise.load_streamed_model
    monkeypatch.setattr(
        layerwise, "load_streamed_model", lambda *a, **k: model_of.append(real_load(*a, **k)) or model_of[0]
    )
    monkeypatch.setattr(layerwise, "run_layer", run)
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained",
        lambda *a, **k: pytest.fail("the layerwise path loaded the model"),
    )
    quantize_streamed(QuantizeConfig(method="gptq", calibration=SMALL_CALIBRATION), src, out)
    assert seen == [[0], [1], [2], [3]]
    assert resident_layers(model_of[0]) == []


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
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained",
        lambda *a, **k: pytest.fail("the streamed path loaded the model"),
    )
    quantize_streamed(QuantizeConfig(method="rtn"), src, out)
    assert len(held) == len(checkpoint_tensors(src)) and max(held) < sum(held) / 4


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streaming_equals_the_whole_model_path_on_the_reference_model(tmp_path, method):
    """SmolLM2-135M as its model step stores it: every code and every checkpoint tensor identical."""
    from pipeline.configs import ModelConfig
    from pipeline.models import import_model
    from pipeline.recipe import ModelSource

    src = tmp_path / "model"
    src.mkdir()
    import_model(ModelConfig(source=str(REFERENCE_GGUF)), ModelSource("gguf", str(REFERENCE_GGUF)), src, print)
    assert_same_artifact(
        *both_paths(src, tmp_path, method=method, lm_head="int4", embedding="int4", group_size=32, symmetric=False)
    )
