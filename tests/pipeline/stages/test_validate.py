import json

from pipeline.stages.validate.stage import gate
from pipeline.stages.validate.targets import agreement


def test_gate_reports_every_failure_with_value_and_limit():
    failures = gate(
        {"perplexity_delta_pct": 0.5, "top1_agreement": 0.9, "greedy_token_agreement": 1.0},
        {"perplexity_delta_pct": 0.1, "top1_agreement": 0.99, "greedy_token_agreement": 1.0},
    )
    assert failures == ["perplexity_delta_pct = 0.5 > max 0.1", "top1_agreement = 0.9 < min 0.99"]


def test_gate_fails_on_unmeasured_metric_and_nonfinite_logits():
    failures = gate({"nonfinite_logits": 3}, {"kl_divergence": 0.1})
    assert failures[0].startswith("kl_divergence = None (not measured")
    assert "NaN/Inf" in failures[1]


def test_agreement_counts_positions_over_the_longer_sequence():
    assert agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert agreement([[1, 2, 3, 4]], [[1, 9, 3]]) == 0.5
    assert agreement([[]], [[]]) == 1.0


def test_report_has_metrics_protocol_and_samples(tiny_run):
    folder = next(tiny_run.glob("02-validate-*"))
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] and not report["failures"]
    assert report["protocol"]["windows"] == 4 and report["protocol"]["context_length"] == 64
    assert report["metrics"]["perplexity_delta_pct"] < 0.1
    assert report["metrics"]["greedy_token_agreement"] == 1.0
    assert report["metrics"]["batch_greedy_agreement"] == 1.0
    assert report["metrics"]["nonfinite_logits"] == 0
    assert len(report["samples"]) == 4
    md = (folder / "report.md").read_text()
    assert "PASSED" in md and "| perplexity_delta_pct |" in md


def test_validate_after_quantize_holds_one_pytorch_model_at_a_time(tmp_path, tiny_llama, eval_text, monkeypatch):
    """The baseline (perplexity, greedy, chat) and the export's source (decode parity) are loaded one after the other."""
    import gc
    import weakref

    from conftest import write_targets_recipe

    import pipeline.stages.validate.stage as stage
    from pipeline import run

    loaded: list[weakref.ref] = []
    alive_at_load: list[int] = []
    real = stage.load_reference_model

    def tracking(folder, *a, **k):
        gc.collect()
        alive_at_load.append(sum(r() is not None for r in loaded))
        model = real(folder, *a, **k)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(stage, "load_reference_model", tracking)
    quantize = "{method: rtn, bits: 4, group_size: 32, lm_head: float, embedding: float}"
    run_dir = run(write_targets_recipe(tmp_path, tiny_llama, eval_text, quantize, "[onnx]"), workdir=tmp_path / "a")
    assert alive_at_load == [0, 0]  # the baseline, then the quantized source: never both
    report = json.loads((next(run_dir.glob("03-validate-*")) / "report.json").read_text())
    assert (
        report["metrics"]["decode_logits_max_abs_diff"] < 1e-3
    )  # parity against the quantized source, not the baseline


def test_a_streamed_baseline_measures_what_the_whole_model_measures(
    tmp_path, tiny_run, tiny_llama, eval_text, monkeypatch
):
    """Above WHOLE_MODEL_LIMIT the baseline is streamed layer by layer (windows and prompts batched): the same
    perplexity up to float rounding, the same greedy replies."""
    from conftest import write_recipe

    from pipeline import run

    monkeypatch.setattr("pipeline.streamed.WHOLE_MODEL_LIMIT", 0)
    streamed_run = run(write_recipe(tmp_path, tiny_llama, eval_text), workdir=tmp_path / "a")
    whole, streamed = (
        json.loads((next(r.glob("02-validate-*")) / "report.json").read_text()) for r in (tiny_run, streamed_run)
    )
    assert (whole["torch_reference"], streamed["torch_reference"]) == ("whole model", "streamed layer by layer")
    for name in ("perplexity_baseline", "perplexity", "top1_agreement", "greedy_token_agreement"):
        assert abs(whole["metrics"][name] - streamed["metrics"][name]) <= 1e-6 * abs(whole["metrics"][name]), name
    assert [s["baseline"] for s in whole["samples"]] == [s["baseline"] for s in streamed["samples"]]


def test_a_plain_limit_holds_on_every_text_and_a_named_one_on_its_own():
    metrics = {
        "perplexity_delta_pct": 0.5,
        "perplexity_delta_pct@prose": 0.5,
        "perplexity_delta_pct@code": 3.0,
        "top1_agreement": 0.95,
        "top1_agreement@prose": 0.95,
        "top1_agreement@code": 0.8,
    }
    failures = gate(metrics, {"perplexity_delta_pct": 1.0, "top1_agreement@code": 0.9})
    assert failures == ["perplexity_delta_pct@code = 3 > max 1", "top1_agreement@code = 0.8 < min 0.9"]


def test_several_evaluation_texts_are_scored_gated_and_reported_each(tmp_path, tiny_llama, eval_text):
    import pytest
    from conftest import write_recipe

    from pipeline import ValidationFailed, run

    recipe = write_recipe(tmp_path, tiny_llama, eval_text)
    domains = (
        f"eval_data: {{prose: {{source: {eval_text}}}, plays: {{source: tinyshakespeare, split: test}}, "
        "code: {source: python-code, split: test}}"
    )
    text = recipe.read_text().replace(f"eval_data: {{source: {eval_text}}}", domains)
    recipe.write_text(
        text.replace(
            "max_new_tokens: 8",
            "max_new_tokens: 8\n      thresholds: {perplexity_delta_pct: 0.1, kl_divergence@plays: -1}\n      default_gates: false",
        )
    )
    with pytest.raises(ValidationFailed) as failed:
        run(recipe, workdir=tmp_path / "w")
    assert [f for f in failed.value.failures if "@" in f] == [
        f for f in failed.value.failures if f.startswith("kl_divergence@plays = ")
    ]
    assert len(failed.value.failures) == 1  # the plain limit held on all three texts
    folder = next((tmp_path / "w" / "tiny").glob("02-validate-*"))
    report = json.loads((folder / "report.json").read_text())
    m = report["metrics"]
    assert m["perplexity_delta_pct"] == m["perplexity_delta_pct@prose"]  # the first text under the plain names too
    assert {k.partition("@")[2] for k in m if "@" in k} == {"prose", "plays", "code"}
    assert m["perplexity@code"] != m["perplexity@plays"]
    assert report["protocol"]["domains"]["plays"]["dataset"] == "tinyshakespeare"
    md = (folder / "report.md").read_text()
    assert "## Per evaluation text" in md and "| plays | tinyshakespeare / test |" in md and "**FAIL**" in md


def test_per_domain_limits_name_a_domain_that_is_evaluated(tmp_path, tiny_llama, eval_text):
    import pytest
    from conftest import write_recipe

    from pipeline import RecipeError
    from pipeline.recipe import load_recipe

    recipe = write_recipe(tmp_path, tiny_llama, eval_text)
    one = recipe.read_text().replace(
        "max_new_tokens: 8", "max_new_tokens: 8\n      thresholds: {top1_agreement@code: 0.9}"
    )
    recipe.write_text(one)
    with pytest.raises(
        RecipeError, match=r"thresholds.top1_agreement@code: a per-domain limit is one of .*\(it names one text\)"
    ):
        load_recipe(recipe)
    two = one.replace(
        f"eval_data: {{source: {eval_text}}}",
        f"eval_data: {{prose: {{source: {eval_text}}}, plays: {{source: tinyshakespeare, split: tset}}}}",
    )
    recipe.write_text(two.replace("@code", "@plays"))
    with pytest.raises(RecipeError, match=r"eval_data.plays.source: tinyshakespeare: no split 'tset'"):
        load_recipe(recipe)
    recipe.write_text(two.replace("split: tset", "split: test"))
    with pytest.raises(RecipeError, match=r"per-domain limit is one of .* \(prose, plays\)"):
        load_recipe(recipe)
