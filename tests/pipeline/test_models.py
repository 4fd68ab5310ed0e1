"""The model step: what it stores for each source, and in which dtype."""
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import make_checkpoint, write_recipe
from pipeline import RecipeError, run


def stored_dtypes(step: Path) -> set[str]:
    dtypes = set()
    for shard in step.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return dtypes


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-bf16"), "llama", dtype="bfloat16")


def test_a_bf16_checkpoint_stays_bf16_and_exports_the_same_graph_as_its_float32_copy(tmp_path, bf16_checkpoint, eval_text):
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


def test_a_float32_checkpoint_stays_float32(tiny_run):
    assert stored_dtypes(next(tiny_run.glob("00-model-*"))) == {"F32"}


def test_an_unknown_dtype_names_the_key_and_the_choices(tmp_path, tiny_llama, eval_text):
    recipe = write_recipe(tmp_path, tiny_llama, eval_text)
    with pytest.raises(RecipeError, match=r"model\.dtype: 'bfloat17' is not one of auto, float32, bfloat16, float16 "
                                          r"\(did you mean 'bfloat16'\?\)"):
        run(recipe, workdir=tmp_path / "w", overrides=["model.dtype=bfloat17"])
