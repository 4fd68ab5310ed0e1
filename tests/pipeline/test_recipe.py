"""Recipes are validated entirely up front: each mistake is one precise error naming the key."""

import textwrap
from pathlib import Path

import pytest

from pipeline import RecipeError, load_recipe
from pipeline.configs import ValidateConfig


def recipe(tmp_path, body: str):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def base(tmp_path, tiny_llama, eval_text):
    def make(stages: str, model: str | None = None):
        return recipe(
            tmp_path,
            f"model: {{source: {model or tiny_llama}}}\nstages:\n{textwrap.indent(textwrap.dedent(stages), '  ')}",
        )

    return make


def test_valid_recipe_is_typed_with_defaults(base, eval_text):
    r = load_recipe(base(f"- export: {{}}\n- validate: {{eval_data: {{source: {eval_text}}}, context_length: 64}}\n"))
    assert [s.name for s in r.stages] == ["export", "validate"]
    v = r.stages[1].config
    assert isinstance(v, ValidateConfig)
    assert v.stride == 64  # defaults to context_length, resolved before fingerprinting
    assert r.source.kind == "dir" and r.name == f"{Path(r.source.location).name}-r"  # <model>-<recipe>


def test_unknown_key_suggests_the_right_one(base):
    with pytest.raises(RecipeError, match=r"stages\[0\]\.export\.opsett: unknown key \(did you mean 'opset'\?\)"):
        load_recipe(base("- export: {opsett: 17}\n"))


def test_unknown_stage_suggests(base):
    with pytest.raises(RecipeError, match=r"unknown stage 'exprot' \(did you mean 'export'\?\)"):
        load_recipe(base("- exprot: {}\n"))


def test_wrong_type_names_key_and_expected_type(base):
    with pytest.raises(RecipeError, match=r"stages\[0\]\.export\.opset: expected int, got str 'seventeen'"):
        load_recipe(base("- export: {opset: seventeen}\n"))


def test_bool_is_not_an_int(base):
    with pytest.raises(RecipeError, match=r"export\.opset: expected int, got bool"):
        load_recipe(base("- export: {opset: true}\n"))


def test_bad_value_from_post_init(base):
    with pytest.raises(RecipeError, match=r"stages\[0\]\.export\.opset: 9 is not supported"):
        load_recipe(base("- export: {opset: 9}\n"))


def test_float16_export_is_checked(base):
    with pytest.raises(RecipeError, match=r"stages\[0\]\.export\.dtype: 'bfloat16' is not one of float32, float16"):
        load_recipe(base("- export: {dtype: bfloat16}\n"))
    with pytest.raises(RecipeError, match=r"export\.dtype: float16 applies to the fused graph .*set fused: true"):
        load_recipe(base("- export: {dtype: float16, fused: false}\n"))


def test_int8_kv_cache_is_checked(base):
    with pytest.raises(RecipeError, match=r"export\.kv_cache: 'int4' is not one of float, int8"):
        load_recipe(base("- export: {kv_cache: int4}\n"))
    for other in ("dtype: float16", "fused: false"):
        with pytest.raises(RecipeError, match=r"export\.kv_cache: int8 is built for the fused graph in float32"):
            load_recipe(base(f"- export: {{kv_cache: int8, {other}}}\n"))
    with pytest.raises(RecipeError, match=r"export\.kv_calibration\.num_samples: must be a positive integer"):
        load_recipe(base("- export: {kv_cache: int8, kv_calibration: {num_samples: 0}}\n"))


def test_missing_model_path(base, tmp_path):
    with pytest.raises(RecipeError, match=r"model.source: GGUF file .*missing.gguf not found"):
        load_recipe(base("- export: {}\n", model=str(tmp_path / "missing.gguf")))
    with pytest.raises(RecipeError, match=r"model.source: '\./nope' is neither"):
        load_recipe(base("- export: {}\n", model="./nope"))


def test_hub_id_is_accepted_without_touching_the_network(base):
    r = load_recipe(base("- export: {}\n", model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert r.source.kind == "hub"


def test_pickle_only_checkpoint_is_refused(base, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(RecipeError, match="allow_pickle: true"):
        load_recipe(base("- export: {}\n", model=str(ckpt)))


def test_remote_code_needs_consent(base, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"auto_map": {"AutoModelForCausalLM": "x.Y"}}')
    (ckpt / "model.safetensors").write_bytes(b"x")
    with pytest.raises(RecipeError, match="trust_remote_code: true"):
        load_recipe(base("- export: {}\n", model=str(ckpt)))


def test_empty_dataset(base, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(RecipeError, match=r"validate\.eval_data\.source: .*empty.txt is empty"):
        load_recipe(base(f"- export: {{}}\n- validate: {{eval_data: {{source: {empty}}}}}\n"))


def test_missing_dataset_file(base, tmp_path):
    with pytest.raises(RecipeError, match=r"eval_data\.source: text file .*nothere.txt not found"):
        load_recipe(base(f"- export: {{}}\n- validate: {{eval_data: {tmp_path / 'nothere.txt'}}}\n"))


def test_stage_order_is_checked(base):
    with pytest.raises(RecipeError, match=r"stages\[0\]\.validate: needs a onnx artifact"):
        load_recipe(base("- validate: {}\n"))


def test_unknown_threshold_metric(base, eval_text):
    with pytest.raises(
        RecipeError, match=r"thresholds\.perplexity_delta: unknown metric \(did you mean 'perplexity_delta_pct'\?\)"
    ):
        load_recipe(
            base(f"- export: {{}}\n- validate: {{eval_data: {eval_text}, thresholds: {{perplexity_delta: 1}}}}\n")
        )


@pytest.mark.hostile
def test_top_level_typo_and_yaml_error(tmp_path):
    with pytest.raises(RecipeError, match=r"stagse: unknown key \(did you mean 'stages'\?\)"):
        load_recipe(recipe(tmp_path, "model: x/y\nstagse: []\n"))
    with pytest.raises(RecipeError, match=r"r.yaml: line 3: not valid YAML"):
        load_recipe(recipe(tmp_path, "model: x/y\nstages: [\n  - a: : b\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)


@pytest.mark.hostile
@pytest.mark.parametrize(
    "content,message",
    [
        (
            b"name: caf\xe9\nmodel: x/y\nstages: []\n",
            r"r.yaml: line 1: not UTF-8 text \(byte 0xe9\); save the recipe as UTF-8",
        ),
        (b"\xff\xfe" + "model: x/y".encode("utf-16-le"), r"line 1: not UTF-8 text \(byte 0xff\)"),
        (LAUGHS.encode(), r"expands to more than 100000 values through YAML aliases"),
        (b"[" * 5000 + b"]" * 5000, r"nested too deeply to be a recipe|not valid YAML"),
        (b"# " + b"x" * (2**20) + b"\n", r"r.yaml: \d+ bytes; a recipe is at most 1048576 bytes"),
    ],
    ids=["latin-1", "utf-16", "alias-bomb", "deep", "huge"],
)
def test_a_recipe_file_that_is_not_sane_yaml_text_is_one_line(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=message) as caught:
        load_recipe(path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


@pytest.mark.hostile
def test_a_recipe_path_that_is_a_folder_is_one_line(tmp_path):
    with pytest.raises(RecipeError, match=r"is a folder; give the recipe's .yaml file"):
        load_recipe(tmp_path)


def test_shipped_recipes_parse():
    from conftest import REFERENCE_GGUF, ROOT

    if not REFERENCE_GGUF.exists():
        pytest.fail(f"{REFERENCE_GGUF} missing: run `make model`")
    for path in (ROOT / "recipes").glob("*.yaml"):
        assert load_recipe(path).stages


def test_a_recipe_on_a_template_is_the_template_with_its_settings(tmp_path, tiny_llama, eval_text):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "data.txt").write_text(eval_text.read_text())
    (templates / "int4.yaml").write_text(
        f"model: {{source: {tiny_llama}}}\n"
        "stages:\n"
        "  - quantize: {method: rtn, bits: 4, group_size: 16, budget: {max_size_ratio: 1.2}, "
        "calibration: {data: {source: data.txt}}}\n"
        "  - export: {}\n"
    )
    thin = recipe(
        tmp_path,
        """\
        template: templates/int4.yaml
        name: mine
        set:
          quantize.group_size: 32
          quantize.budget: {max_size_mb: 5}
        """,
    )
    r = load_recipe(thin, overrides=["export.opset=19"])
    quantize, export = (s.config for s in r.stages)
    assert r.name == "mine" and r.path == thin
    assert quantize.group_size == 32 and quantize.budget.max_size_mb == 5 and quantize.budget.max_size_ratio is None
    assert export.opset == 19  # --set applies after the template's settings
    # relative paths in the template start at the template's folder
    assert quantize.calibration.data.source == str(templates / "data.txt")
    # without a name the run is named after the model and the file that was run
    (tmp_path / "other.yaml").write_text("template: templates/int4.yaml\n")
    assert load_recipe(tmp_path / "other.yaml").name == f"{tiny_llama.name}-other"
    hub = load_recipe(tmp_path / "other.yaml", overrides=["model.source=org/Some-Model_1B"])
    assert hub.name == "Some-Model_1B-other"


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("template: t.yaml\nstages: []\n", r"r\.yaml: stages: unknown key; allowed: name, set, template"),
        ("template: missing.yaml\n", r"r\.yaml: template: .*missing\.yaml does not exist"),
        ("template: t.yaml\nset: [a]\n", r"r\.yaml: set: expected a mapping of KEY\.PATH: VALUE, got list"),
        ("template: t.yaml\nset: {distill.num_layers: 2}\n", r"r\.yaml: set: distill\.num_layers: the recipe has no 'distill' stage"),
        ("template: t.yaml\nset: {export.opsett: 2}\n", r"r\.yaml: stages\[0\]\.export\.opsett: unknown key \(did you mean 'opset'\?\)"),
        ("template: r.yaml\n", r"a template cannot build on another template"),
        ("template: 3\n", r"template: 3 should be a recipe file"),
    ],
)  # fmt: skip
def test_a_bad_template_recipe_is_one_line(tmp_path, tiny_llama, body, error):
    (tmp_path / "t.yaml").write_text(f"model: {{source: {tiny_llama}}}\nstages:\n  - export: {{}}\n")
    with pytest.raises(RecipeError, match=error) as e:
        load_recipe(recipe(tmp_path, body))
    assert "\n" not in str(e.value)
