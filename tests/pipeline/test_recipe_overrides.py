"""`--set KEY.PATH=VALUE` changes one setting for one run; mistakes are precise one-line errors."""

import textwrap

import pytest
from click.testing import CliRunner

from pipeline import RecipeError, load_recipe
from pipeline.recipe_overrides import apply_overrides


@pytest.fixture
def two_stage(tmp_path, tiny_llama, eval_text):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: r
        model: {{source: {tiny_llama}}}
        stages:
          - export: {{}}
          - validate: {{eval_data: {{source: {eval_text}}}, context_length: 64, max_windows: 4}}
        """)
    )
    return path


def test_overrides_reach_stages_nested_keys_and_top_level_keys(two_stage, eval_text):
    r = load_recipe(
        two_stage,
        [
            "validate.max_windows=2",
            "stages[0].opset=19",
            "name=short",
            "validate.thresholds.top1_agreement=0.5",
            "validate.prompts=[a, b]",
        ],
    )
    assert r.name == "short" and r.stages[0].config.opset == 19
    v = r.stages[1].config
    assert v.max_windows == 2 and v.thresholds == {"top1_agreement": 0.5} and v.prompts == ("a", "b")
    assert v.context_length == 64  # untouched keys keep the file's values


def test_a_stage_without_settings_gets_a_mapping():
    raw = {"model": {"source": "m"}, "stages": [{"export": None}, {"quantize": {"method": "rtn"}}]}
    out = apply_overrides(raw, ["export.opset=18", "quantize.calibration.num_samples=8"])
    assert out["stages"] == [
        {"export": {"opset": 18}},
        {"quantize": {"method": "rtn", "calibration": {"num_samples": 8}}},
    ]
    assert raw["stages"][0] == {"export": None}  # the parsed file is left as it was


@pytest.mark.parametrize(
    "override, message",
    [
        ("validate.max_windows", "expected KEY.PATH=VALUE"),
        ("distill.tokens=10", "no 'distill' stage (stages: export, validate"),
        ("stages[5].opset=18", "stages[5] does not exist"),
        ("validate.max_windowz=2", "max_windowz"),  # the schema's own error, after the override
        ("validate.max_windows=[1", "not valid YAML"),
        ("validate.max_windows=many", "max_windows"),
        ("validate.context_length.x=1", "validate.context_length is 64, not a mapping"),
    ],
)
def test_bad_overrides_are_one_line_errors(two_stage, override, message):
    with pytest.raises(RecipeError, match=None) as e:
        load_recipe(two_stage, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_two_stages_of_one_kind_must_be_named_by_index():
    raw = {"model": {"source": "m"}, "stages": [{"quantize": {}}, {"quantize": {}}]}
    with pytest.raises(RecipeError, match=r"2 'quantize' stages; say which, e.g. stages\[0\]\.bits=8"):
        apply_overrides(raw, ["quantize.bits=8"])


def test_the_cli_takes_repeated_set_options(two_stage, tmp_path):
    from pipeline.cli import main

    result = CliRunner().invoke(
        main, [str(two_stage), "--workdir", str(tmp_path / "a"), "--set", "validate.max_windowz=2"]
    )
    assert result.exit_code == 2 and "max_windowz" in result.output
