"""`optimize tune`: session settings chosen by measurement, saved per machine, taken by the Generator."""

import json

import onnxruntime as ort
import pytest
from click.testing import CliRunner

from pipeline.artifacts import load_verified
from pipeline.cli import main
from runtime import Generator, RuntimeFailure
from runtime import settings as settings_mod
from runtime.settings import SessionSettings, load_tuned, tuning_path
from runtime.tune import thread_counts, tune


@pytest.fixture()
def export(tiny_export, tmp_path, monkeypatch):
    """The tiny export, with a tuning cache of this test's own (other tests share the export)."""
    monkeypatch.setenv("LLM_OPTIMIZE_TUNING_DIR", str(tmp_path / "tuning"))
    return tiny_export


def fake_timings(decode_ms: dict[SessionSettings, float]):
    """A measure function that answers from a table (unlisted settings take 10 ms) and records its calls."""
    calls = []

    def measure(folder, settings, provider, graph, batch, prompt_tokens, steps):
        calls.append(settings)
        return 100.0, decode_ms.get(settings, 10.0)

    return measure, calls


def test_thread_candidates_are_onnxruntimes_choice_powers_of_two_and_every_core():
    assert thread_counts(1) == [0, 1]
    assert thread_counts(6) == [0, 1, 2, 4, 6]
    assert thread_counts(8) == [0, 1, 2, 4, 8]


def test_tune_picks_the_fastest_decode_and_the_generator_takes_it(export, monkeypatch):
    monkeypatch.setattr(settings_mod, "usable_cores", lambda: 4)
    monkeypatch.setattr("runtime.tune.usable_cores", lambda: 4)
    measure, calls = fake_timings({SessionSettings(2, "all"): 8.0, SessionSettings(2, "extended"): 6.0})
    result = tune(export, provider="cpu", rounds=2, log=lambda _: None, measure_fn=measure)
    # threads first at `all` (0, 1, 2, 4), then the three levels at the best count; each twice
    assert calls[:8] == [SessionSettings(t, "all") for t in (0, 1, 2, 4)] + [
        SessionSettings(t, "all") for t in (4, 2, 1, 0)
    ]
    assert set(calls[8:]) == {SessionSettings(2, level) for level in ("basic", "extended", "all")} and len(calls) == 14
    assert result["chosen"] == {"threads": 2, "optimization": "extended"}
    assert result["decode_speedup_vs_default"] == pytest.approx(10.0 / 6.0)
    path = tuning_path(export, "cpu", "fused")
    assert path.parent.name == json.loads((export / "manifest.json").read_text())["fingerprint"][:16]
    saved = json.loads(path.read_text())
    assert saved["chosen"] == result["chosen"] and saved["machine"]["usable_cores"] == 4
    assert len(saved["candidates"]) == 6

    gen = Generator(export, provider="cpu")
    assert gen.settings == SessionSettings(2, "extended") and gen.tuning_file == tuning_path(export, "cpu", "fused")
    options = gen.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert "tuned on this machine" in gen.describe_settings()

    given = Generator(export, provider="cpu", threads=1)  # settings given by the caller win over the tuning
    assert given.settings == SessionSettings(1, "all") and given.tuning_file is None
    assert given.session.get_session_options().intra_op_num_threads == 1


def test_a_gain_inside_the_margin_keeps_the_defaults(export):
    measure, _ = fake_timings({SessionSettings(1, "all"): 9.9, SessionSettings(1, "basic"): 9.8})
    result = tune(export, provider="cpu", rounds=1, log=lambda _: None, measure_fn=measure)
    assert result["chosen"] == {"threads": 0, "optimization": "all"}
    assert result["decode_speedup_vs_default"] == 1.0


def test_a_tuning_from_another_machine_is_not_used(export, monkeypatch):
    measure, _ = fake_timings({SessionSettings(1, "all"): 2.0, SessionSettings(1, "basic"): 1.0})
    tune(export, provider="cpu", rounds=1, log=lambda _: None, measure_fn=measure)
    assert load_tuned(export, "cpu", "fused")[0] == SessionSettings(1, "basic")
    monkeypatch.setattr(settings_mod, "cpu_model", lambda: "another CPU")
    assert load_tuned(export, "cpu", "fused") is None
    assert Generator(export, provider="cpu").settings == SessionSettings()


def test_an_unreadable_tuning_fails_naming_its_file(export):
    path = tuning_path(export, "cpu", "fused")
    path.parent.mkdir(parents=True)
    path.write_text('{"chosen": {"threads": "two"}}')
    with pytest.raises(RuntimeFailure, match=f"{path.name}: unreadable tuning"):
        Generator(export, provider="cpu")


def test_tune_command_measures_every_candidate_and_writes_the_file(export):
    result = CliRunner().invoke(main, ["tune", str(export), "--steps", "2", "--rounds", "1", "--prompt-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "| intra-op threads | graph optimization |" in result.output and "chosen:" in result.output
    saved = json.loads(tuning_path(export, "cpu", "fused").read_text())
    levels = {c["optimization"] for c in saved["candidates"]}
    assert levels == {"basic", "extended", "all"}
    assert all(c["decode_ms_median"] > 0 and c["prefill_ms_median"] > 0 for c in saved["candidates"])
    assert Generator(export, provider="cpu").tuning_file is not None
    assert load_verified(export)[1] == "ok"  # the tuning lives in the machine's cache: the artifact is untouched
