"""The model step: what it stores for each source, and in which dtype."""

import json
from pathlib import Path

import pytest
import torch
from conftest import longrope, make_checkpoint, write_recipe
from safetensors import safe_open

from pipeline import RecipeError, run
from pipeline.models import save_pretrained


def stored_dtypes(step: Path) -> set[str]:
    dtypes = set()
    for shard in step.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return dtypes


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-bf16"), "llama", dtype="bfloat16")


def test_a_bf16_checkpoint_stays_bf16_and_exports_the_same_graph_as_its_float32_copy(
    tmp_path, bf16_checkpoint, eval_text
):
    recipe = write_recipe(tmp_path, bf16_checkpoint, eval_text)
    kept = run(recipe, workdir=tmp_path / "a")
    widened = run(recipe, workdir=tmp_path / "b", overrides=["model.dtype=float32"])
    steps = {name: next(d.glob("00-model-*")) for name, d in (("kept", kept), ("widened", widened))}
    assert stored_dtypes(steps["kept"]) == {"BF16"}  # never rewritten as float32: half the bytes on disk
    assert stored_dtypes(steps["widened"]) == {"F32"}
    assert json.loads((steps["kept"] / "manifest.json").read_text())["metrics"]["dtype"] == "bfloat16"
    size = {k: sum(f.stat().st_size for f in v.glob("*.safetensors")) for k, v in steps.items()}
    assert size["kept"] < 0.6 * size["widened"]
    # the stages compute on the same values: the exported weights are the same bytes
    data = [(next(d.glob("01-export-*")) / "model.onnx.data").read_bytes() for d in (kept, widened)]
    assert data[0] == data[1]


def test_the_tokenizer_loads_on_both_stacks(tiny_run):
    """transformers 5 saves its tokenizer class as TokenizersBackend, which 4.x cannot load; the model step
    names the class both know, so an artifact built on one stack loads on the other."""
    config = json.loads(next(tiny_run.glob("00-model-*/tokenizer_config.json")).read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def rotary_tables(config) -> tuple:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    return rotary.inv_freq, rotary.attention_scaling


def test_config_json_keeps_the_rotary_base_and_scaling_in_the_keys_transformers_4_reads(tmp_path):
    """transformers 5 writes the rotary base only inside `rope_parameters`, which 4.x ignores (it runs at 10,000
    and drops llama3 scaling, silently). Read back from the 4.x keys alone, the tables are the same."""
    from transformers import AutoConfig, LlamaConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        rope_scaling={**scaling, "original_max_position_embeddings": 8192},
    )
    save_pretrained(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_theta"] == 500000.0
    assert {k: saved["rope_scaling"][k] for k in scaling} == scaling
    legacy_only = {k: v for k, v in saved.items() if k != "rope_parameters"}
    (tmp_path / "config.json").write_text(json.dumps(legacy_only))
    expected, got = rotary_tables(config), rotary_tables(AutoConfig.from_pretrained(tmp_path))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]


def test_longrope_keeps_the_three_keys_transformers_4_validates_and_the_length_beside_them(tmp_path):
    """transformers 4's Phi-3 refuses a rope_scaling with other than type, short_factor and long_factor, and reads
    the original length at the top level; read back from those alone, both rotary tables are the same."""
    from transformers import AutoConfig, Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = Phi3Config(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, **longrope(16)
    )
    save_pretrained(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"] == longrope(16)["rope_scaling"]  # transformers 5 fills the dict it was given
    assert saved["original_max_position_embeddings"] == 16
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "rope_parameters"}))
    loaded = AutoConfig.from_pretrained(tmp_path)
    for length in (8, 64):  # short factors within the original length, long past it
        positions = torch.arange(length)[None]
        expected = Phi3RotaryEmbedding(config)(torch.zeros(1), positions)
        got = Phi3RotaryEmbedding(loaded)(torch.zeros(1), positions)
        assert all(torch.equal(e, g) for e, g in zip(expected, got))


def test_the_model_step_writes_the_rotary_base_where_transformers_4_reads_it(tiny_run):
    from transformers import AutoConfig

    step = next(tiny_run.glob("00-model-*"))
    saved = json.loads((step / "config.json").read_text())
    loaded = AutoConfig.from_pretrained(step)
    base = (getattr(loaded, "rope_parameters", None) or {}).get("rope_theta", getattr(loaded, "rope_theta", None))
    assert saved["rope_theta"] == base is not None


def test_a_float32_checkpoint_stays_float32(tiny_run):
    assert stored_dtypes(next(tiny_run.glob("00-model-*"))) == {"F32"}


def test_an_unknown_dtype_names_the_key_and_the_choices(tmp_path, tiny_llama, eval_text):
    recipe = write_recipe(tmp_path, tiny_llama, eval_text)
    with pytest.raises(
        RecipeError,
        match=r"model\.dtype: 'bfloat17' is not one of auto, float32, bfloat16, float16 "
        r"\(did you mean 'bfloat16'\?\)",
    ):
        run(recipe, workdir=tmp_path / "w", overrides=["model.dtype=bfloat17"])


def test_a_local_checkpoint_is_linked_not_loaded(tmp_path, bf16_checkpoint, eval_text, monkeypatch):
    """Its shards keep their dtype, so the model step links them: no second copy on disk, no model in memory."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the model step loaded the whole model")

    import pipeline.steps as steps

    real = steps.import_model

    def guarded(*a, **k):  # the model step only: export and validate load what they load
        with monkeypatch.context() as m:
            m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
            return real(*a, **k)

    monkeypatch.setattr(steps, "import_model", guarded)
    step = next(run(write_recipe(tmp_path, bf16_checkpoint, eval_text), workdir=tmp_path / "a").glob("00-model-*"))
    assert (step / "model.safetensors").stat().st_ino == (bf16_checkpoint / "model.safetensors").stat().st_ino
    config = json.loads((step / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert json.loads((step / "generation_config.json").read_text())["eos_token_id"]


def test_a_checkpoint_with_names_transformers_renames_is_loaded_whole(tmp_path, eval_text):
    from pipeline.checkpoint import CheckpointReader, SafetensorsWriter
    from pipeline.models import streamable

    folder = make_checkpoint(tmp_path / "m", "llama")
    assert streamable(folder)
    reader = CheckpointReader(folder)
    renamed = {name.replace("model.", "", 1) if name.startswith("model.") else name: reader[name] for name in reader}
    with SafetensorsWriter(folder / "model.safetensors") as writer:
        for name, tensor in renamed.items():
            writer.add(name, tensor)
    assert not streamable(folder)


@pytest.mark.hostile
def test_an_unreachable_hub_fails_in_one_line_within_seconds(tmp_path, eval_text, monkeypatch, capsys):
    """A hub id with no network: one line naming the way out, not minutes of retries."""
    import time

    from huggingface_hub import constants

    from pipeline.errors import StageError

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    started = time.time()
    with pytest.raises(
        StageError,
        match=r"model.source: org/not-cached is a hub id, 127.0.0.1 cannot be reached "
        r"\(.*\) and the model is not in the local cache; give a local folder",
    ):
        run(write_recipe(tmp_path, "org/not-cached", eval_text), workdir=tmp_path / "w")
    assert time.time() - started < 30
