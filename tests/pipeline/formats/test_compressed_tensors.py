"""hf-quantized export: our codes packed into compressed-tensors' int32 words unchanged, loaded by
transformers to the same weights, refused where the format cannot hold them, and measured by validate."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import write_targets_recipe
from safetensors.numpy import load_file

from pipeline import run
from pipeline.errors import RecipeError, StageError
from pipeline.formats.compressed_tensors import pack_int32, unpack_int32
from pipeline.quant.primitives import unpack_matmul_nbits
from pipeline.recipe import load_recipe


def recipe(folder, model, text, quantize, targets="[onnx, hf-quantized]", thresholds="{}"):
    return write_targets_recipe(folder, model, text, quantize, targets, thresholds)


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, tiny_qwen2, eval_text):
    """Tied embedding and head sharing int4 codes, v_proj int8 (a mix vLLM cannot fuse), asymmetric."""
    work = tmp_path_factory.mktemp("hfq")
    quantize = (
        "{method: rtn, group_size: 32, symmetric: false, overrides: {'v_proj': 8}, lm_head: int4, embedding: int4}"
    )
    return run(recipe(work, tiny_qwen2, eval_text, quantize), workdir=work / "artifacts")


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_round_trips_and_puts_element_j_at_bits_j_times_b(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 37), dtype=np.uint8)  # 37: a partial word
    words = pack_int32(codes, bits)
    assert words.dtype == np.int32 and words.shape == (3, -(-37 * bits // 32))
    np.testing.assert_array_equal(unpack_int32(words, bits, 37), codes)
    assert (int(words.view(np.uint32)[0, 0]) >> bits) & (2**bits - 1) == codes[0, 1]


def test_codes_scales_and_zero_points_are_copied_unchanged(tied_run):
    quant = next(tied_run.glob("*-quantize-*"))
    plan = json.loads((quant / "quant_plan.json").read_text())["layers"]
    packed = load_file(str(quant / "quantized.safetensors"))
    written = load_file(str(next(tied_run.glob("*-export-*")) / "hf-quantized" / "model.safetensors"))
    checked = 0
    for layer, spec in plan.items():
        if layer == "model.embed_tokens":
            continue
        q, scale, zero = unpack_matmul_nbits(packed, layer, spec)
        n, k, bits = spec["N"], spec["K"], spec["bits"]
        np.testing.assert_array_equal(unpack_int32(written[f"{layer}.weight_packed"], bits, k), q.reshape(n, -1)[:, :k])
        np.testing.assert_array_equal(written[f"{layer}.weight_scale"], scale)
        np.testing.assert_array_equal(unpack_int32(written[f"{layer}.weight_zero_point"].T, bits, n).T, zero)
        assert written[f"{layer}.weight_shape"].tolist() == [n, k]
        checked += 1
    assert checked == 2 * 7 + 1  # every linear of both layers and the head


def test_transformers_loads_the_checkpoint_to_our_weights_and_logits(tied_run):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (make engines)")
    from transformers import AutoModelForCausalLM

    quant = next(tied_run.glob("*-quantize-*"))
    folder = next(tied_run.glob("*-export-*")) / "hf-quantized"
    ours = AutoModelForCausalLM.from_pretrained(quant).eval()
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings is False  # the quantized head beside the float embedding
    ids = torch.randint(0, ours.config.vocab_size, (1, 12))
    with torch.no_grad():  # the first forward decompresses the packed weights
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=0, atol=0)
    theirs = loaded.state_dict()
    for name, weight in ours.state_dict().items():
        torch.testing.assert_close(theirs[name], weight, rtol=0, atol=0, msg=name)


def test_manifest_names_the_float_layers_and_what_vllm_would_refuse(tied_run):
    export = next(tied_run.glob("*-export-*"))
    manifest = json.loads((export / "hf-quantized" / "manifest.json").read_text())
    assert manifest["schemes"] == {"int4 g32 asym": 2 * 6 + 1, "int8 g32 asym": 2}
    assert manifest["float_linears"] == []
    assert manifest["vllm_compatible"] is False
    assert (
        manifest["vllm_problems"][0]
        == "model.layers.0.self_attn: q_proj int4 g32 asym, k_proj int4 g32 asym, v_proj int8 g32 asym"
    )
    config = json.loads((export / "hf-quantized" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quantization_status"] == "compressed"
    assert "model.layers.1.self_attn.v_proj" in config["config_groups"]["group_1"]["targets"]
    step = json.loads((export / "manifest.json").read_text())
    assert step["targets"]["hf-quantized"]["sha256"] == manifest["sha256"]
    assert (export / "hf-quantized" / "tokenizer.json").is_file()


def test_a_uniform_scheme_targets_linear_and_ignores_the_float_head(tmp_path, tiny_llama, eval_text):
    path = recipe(tmp_path, tiny_llama, eval_text, "{method: rtn, group_size: 32, symmetric: true}")
    folder = next(run(path, workdir=tmp_path / "artifacts").glob("*-export-*")) / "hf-quantized"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"]["symmetric"] is True
    assert config["ignore"] == ["lm_head"]
    assert not any(k.endswith("weight_zero_point") for k in load_file(str(folder / "model.safetensors")))


def test_the_validate_stage_measures_the_checkpoint_or_says_why_not(tied_run):
    report = json.loads(next(tied_run.glob("*-validate-*/report.json")).read_text())
    entry = report["targets"]["hf-quantized"]
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        assert entry["validated"] is False and "compressed-tensors" in entry["install"]
    else:
        assert entry["validated"] is True and "compressed-tensors" in entry["engine"]
        # the same weights in float32 through PyTorch: only the summation order differs from ONNX Runtime
        assert report["metrics"]["hf_quantized_perplexity_vs_onnx_pct"] < 0.01
        assert report["metrics"]["hf_quantized_onnx_top1_agreement"] == 1.0


def test_a_missing_engine_is_never_a_pass(tmp_path, tiny_llama, eval_text, monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # as if compressed-tensors were not installed
    path = recipe(
        tmp_path,
        tiny_llama,
        eval_text,
        "{method: rtn, group_size: 32}",
        thresholds="{hf_quantized_perplexity_vs_onnx_pct: 1.0}",
    )
    from pipeline import ValidationFailed

    with pytest.raises(ValidationFailed, match="hf_quantized_perplexity_vs_onnx_pct = None"):
        run(path, workdir=tmp_path / "artifacts")


def test_a_recipe_without_a_quantize_stage_is_refused_when_it_loads(tmp_path, tiny_llama, eval_text):
    with pytest.raises(RecipeError, match="no quantize stage before export"):
        load_recipe(recipe(tmp_path, tiny_llama, eval_text, None))


@pytest.mark.parametrize("activations", ["dynamic", "dynamic_per_token", "static"])
def test_w8a8_copies_the_graphs_int8_codes_and_loads_in_transformers(tmp_path, tiny_llama, eval_text, activations):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (make engines)")
    from transformers import AutoModelForCausalLM

    from pipeline.graph.w8a8 import read_w8a8_codes

    quantize = (
        f"{{method: w8a8, w8a8: {{activations: {activations}}}, calibration: {{num_samples: 4, sequence_length: 32}}}}"
    )
    work = run(recipe(tmp_path, tiny_llama, eval_text, quantize), workdir=tmp_path / "artifacts")
    export = next(work.glob("*-export-*"))
    folder = export / "hf-quantized"
    modules = json.loads((next(work.glob("*-quantize-*")) / "quant_plan.json").read_text())["w8a8_modules"]
    codes = read_w8a8_codes(export / "model.onnx", modules)
    written = load_file(str(folder / "model.safetensors"))
    for module, c in codes.items():
        np.testing.assert_array_equal(written[f"{module}.weight"], c.weight)
        np.testing.assert_array_equal(written[f"{module}.weight_scale"][:, 0], c.scale)
        if activations == "static":  # our calibrated scale, symmetric: no zero point written
            assert c.input_zero_point == 128 and f"{module}.input_zero_point" not in written
            assert (
                written[f"{module}.input_scale"].item() == pytest.approx(c.input_scale, rel=1e-7) and c.input_scale > 0
            )
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert config["format"] == "int-quantized" and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] is activations.startswith("dynamic")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # the first forward decompresses
    weight = model.get_submodule(modules[0]).weight.detach().numpy()
    np.testing.assert_allclose(weight, codes[modules[0]].weight * codes[modules[0]].scale[:, None], rtol=1e-6)
    report = json.loads(next(work.glob("*-validate-*/report.json")).read_text())
    assert report["targets"]["hf-quantized"]["validated"]
    assert report["metrics"]["hf_quantized_perplexity_vs_onnx_pct"] < 5  # the activations are rounded differently


def test_a_w8a8_head_of_a_tied_model_is_untied_and_quantized_in_both_formats(tmp_path, tiny_qwen2, eval_text):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (make engines)")
    from transformers import AutoModelForCausalLM

    quantize = (
        "{method: w8a8, w8a8: {activations: dynamic_per_token}, lm_head: int8, "
        "calibration: {num_samples: 4, sequence_length: 32}}"
    )
    work = run(recipe(tmp_path, tiny_qwen2, eval_text, quantize), workdir=tmp_path / "artifacts")
    export = next(work.glob("*-export-*"))
    ops = [n.op_type for n in onnx_nodes(export / "model.onnx")]
    assert ops.count("MatMulInteger") == 7 * 2 + 1  # every decoder linear and the head
    written = load_file(str(export / "hf-quantized" / "model.safetensors"))
    assert written["lm_head.weight"].dtype == np.int8 and written["model.embed_tokens.weight"].dtype == np.float32
    manifest = json.loads((export / "hf-quantized" / "manifest.json").read_text())
    assert "lm_head" not in manifest["float_linears"] and any("untied" in n for n in manifest["notes"])
    model = AutoModelForCausalLM.from_pretrained(export / "hf-quantized", dtype=torch.float32)
    assert model.config.tie_word_embeddings is False
    report = json.loads(next(work.glob("*-validate-*/report.json")).read_text())
    assert (
        report["targets"]["hf-quantized"]["validated"] and report["metrics"]["hf_quantized_perplexity_vs_onnx_pct"] < 5
    )


def onnx_nodes(path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.node


def test_groups_that_do_not_divide_a_layer_are_refused_before_tracing(tmp_path, tiny_llama, eval_text):
    path = recipe(tmp_path, tiny_llama, eval_text, "{method: rtn, group_size: 128}")  # the tiny model's width is 64
    with pytest.raises(
        StageError, match="64 inputs is not a multiple of group_size 128; compressed-tensors needs whole"
    ):
        run(path, workdir=tmp_path / "artifacts")


def test_bfloat16_rounds_the_float_tensors_and_scales_but_never_the_codes(tmp_path, tiny_llama, eval_text):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (make engines)")
    from safetensors.torch import load_file as load_torch

    from pipeline.formats.compressed_tensors import write_compressed_tensors

    targets = "[onnx, hf-quantized], hf_quantized_dtype: bfloat16"
    run_dir = run(
        recipe(tmp_path, tiny_llama, eval_text, "{method: rtn, group_size: 32, symmetric: false}", targets),
        workdir=tmp_path / "artifacts",
    )
    folder = next(run_dir.glob("*-export-*")) / "hf-quantized"
    half = load_torch(str(folder / "model.safetensors"))
    assert half["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert half["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    write_compressed_tensors(next(run_dir.glob("*-quantize-*")), tmp_path / "f32")  # auto: the model's float32
    full = load_torch(str(tmp_path / "f32" / "model.safetensors"))
    for name, t in full.items():
        if not t.is_floating_point():  # packed codes, zero points, shapes
            torch.testing.assert_close(half[name], t, rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(half[name], t.to(torch.bfloat16), rtol=0, atol=0, msg=name)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and "rounded from float32 to bfloat16" in manifest["notes"][-1]
    report = json.loads(next(run_dir.glob("*-validate-*/report.json")).read_text())
    assert report["targets"]["hf-quantized"]["validated"]  # loaded and run by transformers in bfloat16
    assert report["metrics"]["hf_quantized_perplexity_vs_onnx_pct"] < 2


@pytest.mark.parametrize(
    "export, message",
    [
        ("{targets: [onnx, hf-quantized], hf_quantized_dtype: fp8}", r"hf_quantized_dtype: 'fp8' is not one of auto"),
        ("{hf_quantized_dtype: bfloat16}", r"hf_quantized_dtype: applies to the hf-quantized target"),
    ],
)
def test_bad_hf_quantized_dtype_is_refused_when_the_recipe_loads(tmp_path, tiny_llama, eval_text, export, message):
    path = recipe(tmp_path, tiny_llama, eval_text, "{method: rtn, group_size: 32}")
    path.write_text(path.read_text().replace("export: {targets: [onnx, hf-quantized]}", f"export: {export}"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
