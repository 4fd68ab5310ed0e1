"""Memory estimates before the heavy work: printed for every step, and a step that cannot fit stops the run."""

import pytest
from conftest import REFERENCE_GGUF, write_recipe

from pipeline import StageError, run
from pipeline.estimate import estimate, model_shape
from pipeline.recipe import load_recipe


def test_the_run_prints_each_steps_estimate(tmp_path, tiny_llama, eval_text, capsys):
    run(write_recipe(tmp_path, tiny_llama, eval_text), workdir=tmp_path / "w")
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan:"))
    assert "estimated peak RSS model ~" in plan and "export ~" in plan and "validate ~" in plan and "available)" in plan


def test_a_step_beyond_the_machine_stops_the_run_before_any_step(tmp_path, tiny_llama, eval_text, monkeypatch):
    import pipeline.steps

    monkeypatch.setattr(pipeline.steps, "memory_bytes", lambda: (2**28, 2**27))  # a 256 MiB machine
    with pytest.raises(StageError, match=r"^plan: the \w+ step needs about \d+ GiB and this machine has 0 GiB; "):
        run(write_recipe(tmp_path, tiny_llama, eval_text), workdir=tmp_path / "w")
    assert not list((tmp_path / "w" / "tiny").glob("0*"))


def test_the_shape_of_a_checkpoint_folder_is_read_without_its_weights(tiny_llama, tiny_qwen2):
    import json

    from safetensors import safe_open

    for folder in (tiny_llama, tiny_qwen2):
        shape = model_shape("dir", str(folder), "auto")
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert shape.parameters == sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
        config = json.loads((folder / "config.json").read_text())
        assert (shape.hidden, shape.layers, shape.vocab) == (
            config["hidden_size"],
            config["num_hidden_layers"],
            config["vocab_size"],
        )
        assert shape.stored_bytes == 4 * shape.parameters
    assert (
        model_shape("dir", str(tiny_llama), "bfloat16").stored_bytes
        == 2 * model_shape("dir", str(tiny_llama), "auto").parameters
    )
    assert model_shape("hub", "org/model", "auto") is None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.skipif(
    not REFERENCE_GGUF.is_file(), reason="the reference GGUF is fetched by `make model` (make test does it)"
)
def test_the_reference_ggufs_shape_and_the_estimates_order():
    recipe = load_recipe("recipes/smollm2-int4-gptq.yaml")
    shape = model_shape(recipe.source.kind, recipe.source.location, recipe.model.dtype)
    assert (shape.parameters, shape.hidden, shape.layers, shape.vocab) == (134515008, 576, 30, 49152)
    steps = {s.step: s.peak_bytes for s in estimate(shape, [(e.name, e.config) for e in recipe.stages])}
    assert steps["quantize"] > steps["model"]  # the float32 model and its calibration activations
    streamed = estimate(shape, [(e.name, e.config) for e in load_recipe("recipes/smollm2-int4-rtn.yaml").stages])
    assert next(s for s in streamed if s.step == "quantize").peak_bytes < 0.7 * steps["quantize"]  # RTN streams


def test_an_unreadable_source_leaves_the_error_to_the_model_step(tmp_path, eval_text, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(StageError, match="could not be read as a GGUF model"):
        run(write_recipe(tmp_path, bad, eval_text), workdir=tmp_path / "w")
    assert "plan: no estimate" in capsys.readouterr().out


def test_gptq_follows_one_layer_and_a_sensitivity_budget_the_whole_model():
    from pipeline.configs import BudgetConfig, QuantizeConfig
    from pipeline.estimate import ModelShape

    llama3_8b = ModelShape(8_030_261_248, 2 * 8_030_261_248, 4096, 14336, 128256, 32, tied=False, linked=True)
    plain, budget = (
        estimate(llama3_8b, [("quantize", QuantizeConfig(method="gptq", budget=b))])[1].peak_bytes
        for b in (None, BudgetConfig(max_size_mb=6000))
    )
    assert plain < 20e9 < llama3_8b.float32_bytes < budget  # embeddings, head, one layer, activations, Hessians


LLAMA3_8B = dict(parameters=8_030_261_248, hidden=4096, intermediate=14336, vocab=128256, layers=32, tied=False)
QWEN25_05B = dict(parameters=494_032_768, hidden=896, intermediate=4864, vocab=151936, layers=24, tied=True)


def _shape(spec: dict, q: int, kv: int):
    from pipeline.estimate import ModelShape

    return ModelShape(
        spec["parameters"],
        2 * spec["parameters"],
        spec["hidden"],
        spec["intermediate"],
        spec["vocab"],
        spec["layers"],
        spec["tied"],
        True,
        q,
        kv,
    )


def test_time_follows_the_work_each_step_does():
    from pipeline.configs import BudgetConfig, CalibrationConfig, QuantizeConfig, ValidateConfig
    from pipeline.estimate_time import describe, estimate_seconds

    rate = 215e9  # the reference machine's matmul rate: no timing in the test
    big, small = _shape(LLAMA3_8B, 4096, 1024), _shape(QWEN25_05B, 896, 128)

    def seconds(shape, *stages, kind="dir"):
        return estimate_seconds(shape, list(stages), kind, rate)

    gptq = QuantizeConfig(method="gptq")
    rtn = QuantizeConfig(method="rtn")
    assert seconds(big, ("quantize", rtn))[1] < seconds(big, ("quantize", gptq))[1]
    # GPTQ's sweep and refit grow with N·K² per linear: 8B takes well over its 16x the parameters
    ratio = seconds(big, ("quantize", gptq))[1] / seconds(small, ("quantize", gptq))[1]
    assert ratio > 1.25 * big.parameters / small.parameters
    fewer = QuantizeConfig(method="gptq", calibration=CalibrationConfig(num_samples=32))
    assert seconds(small, ("quantize", fewer))[1] < seconds(small, ("quantize", gptq))[1]
    with_budget = QuantizeConfig(method="gptq", budget=BudgetConfig(max_size_mb=300))
    assert seconds(small, ("quantize", with_budget))[1] > seconds(small, ("quantize", gptq))[1]
    # a validate after quantize reads the smaller graph; more windows take longer
    assert (
        seconds(small, ("quantize", rtn), ("validate", ValidateConfig()))[2]
        < seconds(small, ("validate", ValidateConfig()))[1]
    )
    assert (
        seconds(small, ("validate", ValidateConfig(max_windows=4)))[1]
        < seconds(small, ("validate", ValidateConfig()))[1]
    )
    assert seconds(small, ("export", None), kind="hub")[0] is None  # a download: unknown before it starts
    # the same work on a machine twice as fast takes half the time
    fast = estimate_seconds(small, [("quantize", gptq)], "dir", 2 * rate)[1]
    assert fast == pytest.approx(seconds(small, ("quantize", gptq))[1] / 2, rel=0.01)
    assert (describe(None), describe(42), describe(600), describe(7200)) == ("?", "42 s", "10 min", "2.0 h")


def test_the_matmul_rate_is_measured():
    from pipeline.estimate_time import matmul_rate

    assert 1e8 < matmul_rate() < 1e16
