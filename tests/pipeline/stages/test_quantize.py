"""Quantize stage on tiny models: the plan, the recipe checks, GPTQ beating RTN, and MatMulNBits export."""

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline import RecipeError, load_recipe, run
from pipeline.configs import ExportConfig, QuantizeConfig
from pipeline.models import load_torch_model
from pipeline.recipe import build_config
from pipeline.stages.quantize.plan import make_plan
from runtime import Generator, find_model_folder


def quant_recipe(tmp_path, model, text, quantize: str, name="q", validate="") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: {name}
        model: {{source: {model}}}
        stages:
          - quantize: {quantize}
          - export: {{}}
        """)
        + (f"  - validate: {validate}\n" if validate else "")
    )
    return path


def cal(text, samples=8):
    return f"calibration: {{data: {{source: {text}}}, num_samples: {samples}, sequence_length: 32}}"


def test_plan_ignores_overrides_and_lm_head(tiny_llama):
    model = load_torch_model(tiny_llama)
    cfg = QuantizeConfig(
        method="rtn",
        group_size=32,
        ignore=(r"layers\.0\.self_attn\.o_proj",),
        overrides={r"mlp\.down_proj": 8},
        lm_head="int8",
    )
    plan, skipped = make_plan(model, cfg)
    assert (
        "model.layers.0.self_attn.o_proj" in skipped and "ignore pattern" in skipped["model.layers.0.self_attn.o_proj"]
    )
    assert plan["model.layers.1.mlp.down_proj"].bits == 8 and plan["model.layers.1.mlp.up_proj"].bits == 4
    assert plan["lm_head"].bits == 8 and len(plan) == 2 * 7 - 1 + 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ("{group_size: 48}", r"group_size: 48 is not a power of two >= 16"),
        ("{group_size: 8}", r"group_size: 8 is not a power of two >= 16"),
        ("{bits: 3}", r"bits: 3 bits is not supported"),
        ("{method: gptqq}", r"method: 'gptqq' is not one of rtn, gptq, awq, w8a8 \(did you mean 'gptq'\?\)"),
        ("{method: awq, calibration: {num_samples: 4}}", r"calibration.num_samples: 4 is too few for AWQ"),
        ("{method: awq, awq: {objective: output}}", r"quantize.awq.objective: 'output' is not one of block, linear"),
        ("{method: awq, awq: {codes: round}}", r"quantize.awq.codes: 'round' is not one of clip, gptq"),
        ("{method: gptq, damp: 0.05}", r"quantize.damp: moved to stages\[0\].quantize.gptq.damp"),
        ("{method: awq, awq_codes: clip}", r"quantize.awq_codes: moved to stages\[0\].quantize.awq.codes"),
        ("{method: rtn, gptq: {damp: 0.05}}", r"gptq: settings for method gptq or awq, but method is rtn"),
        ("{ignore: ['(']}", r"not a valid regular expression"),
        ("{overrides: {down_proj: 2}}", r"overrides.down_proj: 2 bits"),
        ("{calibration: {num_samples: 2}}", r"calibration.num_samples: 2 is too few for AWQ"),
        ("{method: gptq, calibration: {num_samples: 2}}", r"calibration.num_samples: 2 is too few for GPTQ"),
        ("{lm_head: int2}", r"lm_head: 'int2' is not one of"),
        ("{lm_head: int4, head_group_size: 24}", r"head_group_size: 24 is not a power of two >= 16"),
        ("{head_group_size: 16}", r"head_group_size: sets the groups of a weight-only quantized lm_head or embedding"),
        ("{embedding: fp8}", r"embedding: 'fp8' is not one of"),
        ("{method: w8a8, w8a8: {smoothquant: 1.5}}", r"w8a8.smoothquant: 1.5 must be in \[0, 1\) or auto"),
        ("{method: w8a8, w8a8: {smoothquant: best}}", r"w8a8.smoothquant: 'best' must be in \[0, 1\) or auto"),
        ("{method: w8a8, w8a8: {smoothquant: [0.5]}}", r"quantize.w8a8.smoothquant: expected float or str, got list"),
        ("{method: gptq, w8a8: {smoothquant: auto}}", r"w8a8: settings for method w8a8, but method is gptq"),
        ("{method: gptq, w8a8: {hadamard: true, activations: static}}", r"w8a8: settings for method w8a8, but"),
        (
            "{method: w8a8, w8a8: {hadamard: true}}",
            r"w8a8.hadamard: .* use it with activations: static or dynamic_per_token",
        ),
        ("{method: w8a8, lm_head: int4}", r"lm_head/embedding: w8a8 quantizes the LM head to W8A8 with lm_head: int8"),
        ("{method: w8a8, embedding: int8}", r"lm_head/embedding: w8a8 .* keeps the embedding float"),
        (
            "{method: w8a8, lm_head: int8, ignore: ['head']}",
            r"ignore: 'head' matches lm_head, which lm_head: int8 quantizes",
        ),
        (
            "{method: rtn, lm_head: int4, ignore: ['.*_head']}",
            r"ignore: '.\*_head' matches lm_head, which lm_head: int4",
        ),
        ("{zero_point: half}", r"zero_point: 'half' is not one of int, float"),
        (
            "{refit_scales: false, code_descent: true}",
            r"code_descent: runs inside the refit .* \(got method awq, refit_scales false\)",
        ),
        ("{method: rtn, code_descent: true}", r"code_descent: .* \(got method rtn, refit_scales true\)"),
        (
            "{symmetric: true, zero_point: float}",
            r"zero_point: float is for asymmetric .* \(got symmetric: true, method awq\)",
        ),
        (
            "{method: w8a8, zero_point: float}",
            r"zero_point: float is for asymmetric .* \(got symmetric: false, method w8a8\)",
        ),
    ],
)
def test_bad_quantize_settings(tmp_path, tiny_llama, settings, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(quant_recipe(tmp_path, tiny_llama, None, settings))


def test_empty_calibration_text_is_refused(tmp_path, tiny_llama):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(RecipeError, match=r"quantize\.calibration\.data\.source: .*e.txt is empty"):
        load_recipe(quant_recipe(tmp_path, tiny_llama, None, f"{{{cal(empty)}}}"))


def test_too_little_calibration_text(tmp_path, tiny_llama):
    short = tmp_path / "s.txt"
    short.write_text("just a few words")
    with pytest.raises(Exception, match=r"fewer than one block of 32"):
        run(quant_recipe(tmp_path, tiny_llama, None, f"{{{cal(short)}}}"), workdir=tmp_path / "a")


def _logit_error(model_dir, ref, ids) -> float:
    with torch.no_grad():
        return float((load_torch_model(model_dir)(ids).logits - ref).pow(2).mean())


@pytest.mark.parametrize(
    "method",
    [
        "gptq",
        "gptq, refit_scales: false",
        "gptq, code_descent: true",
        "awq",
        "awq, refit_scales: false",
        "awq, code_descent: true",
        "awq, awq: {codes: clip}",
        "awq, awq: {codes: clip}, refit_scales: false",
        "awq, awq: {codes: clip}, code_descent: true",
    ],
    ids=[
        "gptq",
        "gptq-no-refit",
        "gptq-descent",
        "awq-gptq",
        "awq-gptq-no-refit",
        "awq-gptq-descent",
        "awq-clip",
        "awq-clip-no-refit",
        "awq-clip-descent",
    ],
)
def test_calibrated_method_beats_rtn_on_the_calibration_text(tmp_path, tiny_llama, eval_text, method):
    settings = "group_size: 16, bits: 4, symmetric: true, " + cal(eval_text, 16)
    rtn = run(
        quant_recipe(tmp_path, tiny_llama, eval_text, f"{{method: rtn, {settings}}}", "rtn"), workdir=tmp_path / "a"
    )
    gptq = run(
        quant_recipe(tmp_path, tiny_llama, eval_text, f"{{method: {method}, {settings}}}", "calibrated"),
        workdir=tmp_path / "a",
    )
    tokens = Generator(find_model_folder(rtn)).tokenizer.encode(eval_text.read_text()[:2000])
    ids = torch.tensor([tokens[:128]])
    with torch.no_grad():
        ref = load_torch_model(tiny_llama)(ids).logits
    e_rtn = _logit_error(next(rtn.glob("01-quantize-*")), ref, ids)
    e_gptq = _logit_error(next(gptq.glob("01-quantize-*")), ref, ids)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    manifest = json.loads(next(gptq.glob("01-quantize-*/manifest.json")).read_text())
    assert len(manifest["layer_seconds"]) == 2 and manifest["metrics"]["seconds_per_layer"] > 0  # the scale ladder's


def test_export_uses_matmul_nbits_and_matches_the_dequantized_model(tmp_path, tiny_llama, eval_text):
    settings = f"{{method: rtn, group_size: 32, overrides: {{down_proj: 8}}, lm_head: int8, {cal(eval_text)}}}"
    run_dir = run(
        quant_recipe(
            tmp_path,
            tiny_llama,
            eval_text,
            settings,
            validate=f"{{eval_data: {eval_text}, context_length: 64, max_windows: 2, "
            "thresholds: {decode_logits_max_abs_diff: 0.001}, default_gates: false}",
        ),
        workdir=tmp_path / "a",
    )
    export = find_model_folder(run_dir)
    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)
    assert bits == [4] * 12 + [8] * 3  # 2 layers x (q,k,v,o,gate,up) int4; 2 down_proj + lm_head int8
    assert not [n for n in graph.node if n.op_type == "MatMul" and "proj" in n.name]
    plan = json.loads(next(run_dir.glob("01-quantize-*/quant_plan.json")).read_text())
    assert plan["layers"]["lm_head"]["bits"] == 8
    manifest = json.loads(next(run_dir.glob("01-quantize-*/manifest.json")).read_text())
    assert manifest["skipped_layers"] == {"model.embed_tokens": "embedding: float (recipe)"}
    contract = json.loads((export / "io_contract.json").read_text())
    assert contract["weights"] == "MatMulNBits"
    report = json.loads(next(run_dir.glob("03-validate-*/report.json")).read_text())
    assert report["passed"] and "kl_divergence" in report["metrics"]


@pytest.mark.parametrize(
    "family, embedding, lm_head, head_groups",
    [
        ("qwen2", "int4", "int4", 16),
        ("qwen2", "int4", "int4", 32),
        ("qwen2", "int8", "int4", 16),
        ("llama", "int8", "float", 16),
    ],
)
def test_quantized_embedding_runs_through_gather_block_quantized(
    tmp_path, tiny_llama, tiny_qwen2, eval_text, family, embedding, lm_head, head_groups
):
    """qwen2 ties embedding and head: equal schemes share one copy; otherwise each has its own. head_group_size
    gives both their own groups, apart from the decoder layers'."""
    model = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    settings = (
        f"{{method: rtn, group_size: 16, head_group_size: {head_groups}, embedding: {embedding}, lm_head: {lm_head}, "
        f"{cal(eval_text)}}}"
    )
    run_dir = run(quant_recipe(tmp_path, model, eval_text, settings), workdir=tmp_path / "a")
    export = find_model_folder(run_dir)
    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "GatherBlockQuantized" in ops and not any(
        n.op_type == "Gather" and n.input[0].endswith("embed_tokens.weight") for n in graph.node
    )
    shared = family == "qwen2" and embedding == lm_head
    assert ("Reshape" in [n.op_type for n in graph.node if "embed_tokens" in n.name]) == shared
    plan = json.loads(next(run_dir.glob("01-quantize-*/quant_plan.json")).read_text())
    assert plan["layers"]["model.embed_tokens"]["shared_with"] == ("lm_head" if shared else None)
    assert plan["layers"]["model.embed_tokens"]["group_size"] == head_groups
    assert {s["group_size"] for n, s in plan["layers"].items() if n.startswith("model.layers.")} == {16}
    assert lm_head == "float" or plan["layers"]["lm_head"]["group_size"] == head_groups
    # the export-time parity check already compared ONNX with the dequantized PyTorch model; generate too
    assert Generator(export).generate([[5, 6, 7]], 4, ignore_eos=True).tokens[0]
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["metrics"]["parity_max_abs_diff"] < 1e-3


def test_embedding_group_must_divide_hidden(tmp_path, tiny_llama, eval_text):
    settings = f"{{method: rtn, group_size: 128, embedding: int8, {cal(eval_text)}}}"
    with pytest.raises(Exception, match=r"hidden size 64 is not a multiple of group_size 128"):
        run(quant_recipe(tmp_path, tiny_llama, eval_text, settings), workdir=tmp_path / "a")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_awq_scaling_is_exact_in_float(tmp_path, family):
    """Folding the AWQ scales changes no output before rounding: checked with 8-bit-free float weights. Gemma's
    norms multiply by 1 + weight, and its MLP reads pre_feedforward_layernorm, not post_attention_layernorm."""
    from conftest import make_checkpoint

    from pipeline.quant.primitives import QuantScheme
    from pipeline.stages.quantize import awq as quantize_awq

    model = load_torch_model(make_checkpoint(tmp_path, family))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    layer = model.model.layers[0]
    from calibration.collect import capture_layer_inputs

    hidden, kwargs = capture_layer_inputs(model, [ids])
    collected = quantize_awq.collect_inputs(layer, hidden, kwargs, 64, torch.Generator().manual_seed(0), 0)
    stats = {n: s.result() for n, s in collected.items()}
    plan = {
        f"model.layers.0.{n}": QuantScheme(4, 16, False)
        for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    judges = quantize_awq.block_judges(layer, hidden[0], kwargs[0], stats)
    groups = quantize_awq.scale_groups(layer)
    mlp_feeder = "pre_feedforward_layernorm" if family == "gemma2" else "post_attention_layernorm"
    norms = {f: layer.get_submodule(f).weight.clone() for f, _ in groups if f.endswith("layernorm")}
    assert list(norms) == ["input_layernorm", mlp_feeder]
    for feeder, names in groups:
        quantize_awq._scale_group(layer, feeder, names, "model.layers.0.", plan, stats, judges.get(feeder))
    assert all(not torch.equal(layer.get_submodule(f).weight, w) for f, w in norms.items())  # the folds happened
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_awq_fold_turns_each_hessian_into_that_of_the_scaled_inputs(tiny_llama):
    """After the folds, the Hessians kept for `awq.codes: gptq` equal the ones collected again from the folded layer."""
    from calibration.collect import capture_layer_inputs
    from pipeline.quant.primitives import QuantScheme
    from pipeline.stages.quantize import awq as quantize_awq

    model = load_torch_model(tiny_llama)
    layer = model.model.layers[0]
    hidden, kwargs = capture_layer_inputs(model, [torch.randint(0, model.config.vocab_size, (2, 24))])
    firsts = [names[0] for _, names in quantize_awq.scale_groups(layer)]

    def collect():
        return quantize_awq.collect_inputs(
            layer, hidden, kwargs, 64, torch.Generator().manual_seed(0), 0, hessians=firsts
        )

    collected = collect()
    stats = {n: s.result() for n, s in collected.items()}
    hessians = quantize_awq.shared_hessians(layer, collected)
    assert (
        hessians["self_attn.k_proj"] is hessians["self_attn.q_proj"]
        and hessians["mlp.up_proj"] is hessians["mlp.gate_proj"]
    )
    before = {n: h.clone() for n, h in hessians.items()}
    plan = {
        f"model.layers.0.{n}": QuantScheme(4, 16, False)
        for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    for feeder, names in quantize_awq.scale_groups(layer):
        quantize_awq._scale_group(layer, feeder, names, "model.layers.0.", plan, stats, None, hessians.get(names[0]))
    again = quantize_awq.shared_hessians(layer, collect())
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert not torch.allclose(hessians[name], before[name], rtol=1e-3), f"{name}: no fold happened"
        torch.testing.assert_close(hessians[name], again[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        "{method: w8a8, w8a8: {activations: dynamic}}",
        "{method: w8a8, w8a8: {activations: dynamic_per_token, smoothquant: auto}}",
        "{method: w8a8, w8a8: {activations: static, smoothquant: 0.5}}",
        "{method: w8a8, w8a8: {activations: static, smoothquant: auto, hadamard: true}}",
        "{method: w8a8, w8a8: {activations: dynamic}, ignore: ['down_proj']}",
    ],
)
def test_w8a8_exports_integer_ops_and_stays_close(tmp_path, tiny_llama, eval_text, settings):
    settings = settings[:-1] + f", {cal(eval_text, 4)}}}"
    run_dir = run(
        quant_recipe(
            tmp_path,
            tiny_llama,
            eval_text,
            settings,
            validate=f"{{eval_data: {eval_text}, context_length: 64, max_windows: 2, "
            "thresholds: {perplexity_delta_pct: 5}, default_gates: false}",
        ),
        workdir=tmp_path / "a",
    )
    export = find_model_folder(run_dir)
    nodes = onnx.load(str(export / "model.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    ignored = 2 if "ignore" in settings else 0  # down_proj of both layers
    assert ops.count("MatMulInteger") == 7 * 2 - ignored
    if "static" in settings:  # constant scales: one QuantizeLinear per distinct input (qkv, o, gate/up, down)
        assert ops.count("QuantizeLinear") == 4 * 2 and "DequantizeLinear" not in ops and "ReduceMax" not in ops
    # only the decoder's linears: the rotary table, the two activation x activation matmuls of each
    # attention and the LM head stay float
    float_matmuls = [n for n in nodes if n.op_type == "MatMul"]
    rotated = 2 if "hadamard" in settings else 0  # down_proj's input rotation, one per layer
    rotary = sum("rotary_emb" in n.name for n in float_matmuls)  # transformers 5 traces the table without one
    assert rotary <= 1 and len(float_matmuls) == rotary + 2 * 2 + 1 + ignored + rotated
    contract = json.loads((export / "io_contract.json").read_text())
    assert contract["weights"].startswith("int8 W8A8")
    report = json.loads(next(run_dir.glob("*-validate-*/report.json")).read_text())
    assert report["passed"] and report["metrics"]["perplexity_delta_pct"] != 0
    fused = export / "fused" / "model.onnx"
    if (
        "dynamic_per_token" in settings or "static" in settings
    ):  # our rewrites: the fused graph (GroupQueryAttention) too
        fused_ops = [n.op_type for n in onnx.load(str(fused), load_external_data=False).graph.node]
        assert fused_ops.count("MatMulInteger") == 7 * 2 and "GroupQueryAttention" in fused_ops
        assert report["graph"] == "fused"
    else:  # ONNX Runtime's tools quantize the portable graph only
        assert not fused.exists() and report["graph"] == "portable"


def test_static_w8a8_with_an_int8_kv_cache(tmp_path, tiny_llama, eval_text):
    """Both int8 rewrites in one fused graph: the activation quantization and the KV cache's."""
    path = quant_recipe(
        tmp_path,
        tiny_llama,
        eval_text,
        f"{{method: w8a8, w8a8: {{activations: static}}, {cal(eval_text, 4)}}}",
        validate=f"{{eval_data: {eval_text}, context_length: 64, max_windows: 2, "
        "thresholds: {perplexity_delta_pct: 5}, default_gates: false}",
    )
    kv = f"{{kv_cache: int8, kv_calibration: {{data: {{source: {eval_text}}}, num_samples: 4, sequence_length: 32}}}}"
    path.write_text(path.read_text().replace("export: {}", f"export: {kv}"))
    run_dir = run(path, workdir=tmp_path / "a")
    export = find_model_folder(run_dir)
    fused = onnx.load(str(export / "fused" / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in fused.node].count("MatMulInteger") == 7 * 2
    assert {i.type.tensor_type.elem_type for i in fused.input if i.name.startswith("past_")} == {onnx.TensorProto.INT8}
    twin = onnx.load(
        str(export / "fused" / "model_prefill.onnx"), load_external_data=False
    ).graph  # derived after the rewrite
    assert [n.op_type for n in twin.node].count("MatMulInteger") == 7 * 2
    assert {i.type.tensor_type.elem_type for i in twin.input if i.name.startswith("past_")} == {onnx.TensorProto.FLOAT}
    report = json.loads(next(run_dir.glob("*-validate-*/report.json")).read_text())
    assert report["passed"] and report["graph"] == "fused"


@pytest.mark.parametrize("opset", [17, 18])
def test_per_token_w8a8_rounds_each_token_on_its_own_scale(tmp_path, opset):
    """The rewritten graph computes exactly: int8 codes per token and per output channel, integer matmul, rescale."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.graph.w8a8 import quantize_int8_linears, read_w8a8_codes

    rng = np.random.default_rng(opset)
    w = rng.normal(size=(16, 8)).astype(np.float32)  # [K, N], as the traced graph holds a linear's weight
    w[:, 0] = np.abs(w[:, 0])  # column 0's codes are all positive and one of them 127 ...
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/model/model/layers.0/mlp/up_proj/MatMul")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    quantized = quantize_int8_linears(path, ["model.layers.0.mlp.up_proj"])
    matmul = next(n for n in quantized.graph.node if n.op_type == "MatMulInteger")
    codes_cast = next(n for n in quantized.graph.node if n.output[0] == matmul.input[0])
    assert codes_cast.attribute[0].i == TensorProto.UINT8 and len(matmul.input) == 4  # uint8 x uint8: exact everywhere
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    x[0, 0] *= 100  # an outlier token: per token, it coarsens only its own row
    # ... and this token's codes are all 127 (uint8 255): uint8 x int8 would saturate on AVX2 without VNNI
    x[1, 2] = 1.0
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    s_x = np.abs(x).max(-1, keepdims=True) / 127
    s_w = np.abs(w).max(0) / 127
    q_x, q_w = np.clip(np.round(x / s_x), -127, 127), np.clip(np.round(w / s_w), -127, 127)
    np.testing.assert_allclose(got, (q_x @ q_w) * s_x * s_w, rtol=1e-5)
    assert np.abs(got - x @ w)[1].max() < 0.05 * np.abs(x[1] @ w).max()  # the ordinary tokens stay close
    onnx.save(quantized, str(path))
    codes = read_w8a8_codes(path, ["model.layers.0.mlp.up_proj"])["model.layers.0.mlp.up_proj"]
    np.testing.assert_array_equal(codes.weight, q_w.T.astype(np.int8))


def test_static_w8a8_graph_rounds_like_the_calibration_model(tmp_path):
    """The static rewrite computes exactly what the quantize stage's search modelled: QuantizeLinear
    codes on the calibrated scale (uint8, zero point 128), integer matmul, rescale; codes read back."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.graph.w8a8 import quantize_int8_linears, read_w8a8_codes
    from pipeline.stages.quantize.w8a8 import fake_quant_static, fake_quant_weight, search_clip

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"], name="/model/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("MatMul", ["x", "W2"], ["y2"], name="/model/model/layers.0/mlp/gate_proj/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w[:, ::-1].copy(), "W2")],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.laplace(size=(8192, 16)).astype(np.float32)  # a long tail: clipping its last stretch buys a finer grid
    found = search_clip(torch.from_numpy(x), float(np.abs(x).max()), [torch.from_numpy(w.T.copy())])
    assert found["clip"] < 1 and found["scale"] == pytest.approx(found["clip"] * np.abs(x).max() / 127)
    x = x[:64]
    modules = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"]
    quantized = quantize_int8_linears(path, modules, {m: found["scale"] for m in modules})
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("MatMulInteger") == 2  # the two linears share x's codes
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[None]}
    )[0][0]
    expected = (
        fake_quant_static(torch.from_numpy(x), found["scale"]) @ fake_quant_weight(torch.from_numpy(w.T.copy())).T
    )
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    onnx.save(quantized, str(path))
    codes = read_w8a8_codes(path, modules)["model.layers.0.mlp.up_proj"]
    assert codes.input_scale == pytest.approx(found["scale"]) and codes.input_zero_point == 128
    with pytest.raises(Exception, match="calibrated to different input scales"):
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        quantize_int8_linears(path, modules, {modules[0]: 0.1, modules[1]: 0.2})


@pytest.mark.parametrize("static", [True, False])
def test_hadamard_w8a8_graph_rotates_the_input_and_the_weights_alike(tmp_path, static):
    """With a rotation, the graph rounds x Q against Qᵀ W: what the quantize stage's searches modelled,
    and the same float product."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.graph.w8a8 import quantize_int8_linears
    from pipeline.quant.rotation import rotate
    from pipeline.stages.quantize.w8a8 import fake_quant_static, fake_quant_weight

    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 8)).astype(np.float32)  # [K, N]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/model/model/layers.0/mlp/down_proj/MatMul")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    xr, wr = rotate(torch.from_numpy(x), 16), rotate(torch.from_numpy(w.T.copy()), 16)
    module, scale = "model.layers.0.mlp.down_proj", float(xr.abs().max()) / 127
    quantized = quantize_int8_linears(path, [module], {module: scale} if static else None, {module: 16})
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    if static:
        expected = fake_quant_static(xr, scale) @ fake_quant_weight(wr).T
    else:
        s = xr.abs().amax(-1, keepdim=True) / 127
        expected = (xr / s).round() * s @ fake_quant_weight(wr).T
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(got - x @ w).max() < 0.05 * np.abs(x @ w).max()  # still the same linear
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("MatMulInteger") == 1  # the rotation: one small float matmul


def test_hadamard_into_compressed_tensors_is_refused_when_the_recipe_loads(tmp_path, tiny_llama):
    path = quant_recipe(tmp_path, tiny_llama, None, "{method: w8a8, w8a8: {activations: static, hadamard: true}}")
    path.write_text(path.read_text().replace("export: {}", "export: {targets: [onnx, hf-quantized]}"))
    with pytest.raises(RecipeError, match="hf-quantized cannot hold hadamard: true"):
        load_recipe(path)


def test_w8a8_into_a_float16_graph_is_refused_when_the_recipe_loads(tmp_path, tiny_llama):
    path = quant_recipe(tmp_path, tiny_llama, None, "{method: w8a8}")
    path.write_text(path.read_text().replace("export: {}", "export: {dtype: float16}"))
    with pytest.raises(RecipeError, match=r"export.dtype: float16 is for the CUDA provider and W8A8 runs on the CPU"):
        load_recipe(path)


def test_an_int8_kv_cache_without_a_fused_graph_is_refused_when_the_recipe_loads(tmp_path, tiny_llama):
    path = quant_recipe(tmp_path, tiny_llama, None, "{method: w8a8}")  # dynamic activations: no fused graph
    path.write_text(path.read_text().replace("export: {}", "export: {kv_cache: int8}"))
    with pytest.raises(RecipeError, match=r"export.kv_cache: int8 lives in the fused graph"):
        load_recipe(path)
    path.write_text(path.read_text().replace("{method: w8a8}", "{method: w8a8, w8a8: {activations: static}}"))
    assert load_recipe(path)


def test_w8a8_for_cuda_is_refused_with_the_reason(tmp_path, tiny_llama):
    with pytest.raises(RecipeError, match=r"w8a8 targets the CPU provider only.*fall back to the CPU"):
        load_recipe(quant_recipe(tmp_path, tiny_llama, None, "{method: w8a8, provider: cuda}"))


@pytest.mark.parametrize("alpha, activations", [(0.5, "dynamic"), ("auto", "dynamic_per_token"), ("auto", "static")])
def test_smoothquant_migration_is_exact_in_float(tiny_llama, alpha, activations):
    from pipeline.stages.quantize.w8a8 import smoothquant

    model = load_torch_model(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    report = smoothquant(model, [ids], alpha, activations, log=lambda _: None)
    assert len(report) == 2 * 3  # per layer: q/k/v, gate/up, down (o_proj not: grouped-query attention)
    if alpha == 0.5:
        assert all(r["alpha"] == 0.5 for r in report.values())
    else:
        assert all(r["error_vs_none"] <= 1 for r in report.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_smoothquant_folds_o_proj_into_v_proj_with_its_bias_when_widths_line_up():
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.stages.quantize.w8a8 import smoothquant

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for layer in model.model.layers:  # qwen2's q/k/v biases start at zero; make them count
        torch.nn.init.normal_(layer.self_attn.v_proj.bias, std=0.5)
    ids = torch.randint(0, 96, (2, 16))
    o_before = model.model.layers[0].self_attn.o_proj.weight.clone()
    with torch.no_grad():
        ref = model(ids).logits
    report = smoothquant(model, [ids], 0.5, "dynamic_per_token", log=lambda _: None)
    assert "model.layers.0.self_attn.o_proj" in report and "model.layers.0.mlp.down_proj" in report
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight, o_before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_smoothquant_search_migrates_an_outlier_channel_and_leaves_a_flat_input_alone():
    from pipeline.stages.quantize.w8a8 import AUTO_ALPHAS, search_alpha

    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(48, 64, generator=gen) * 0.05]
    x = torch.randn(512, 64, generator=gen)
    x[:, 5] *= 80  # one channel 80x the others: per-token int8 spends its range on it
    alpha, s, ratio = search_alpha(x, x.abs().amax(0), w, AUTO_ALPHAS, "dynamic_per_token")
    assert alpha is not None and s is not None and ratio < 0.2
    assert s[5] == s.max()  # the outlier channel is divided the most

    flat = torch.full((512, 64), 1.0) * torch.where(torch.rand(512, 64, generator=gen) < 0.5, -1.0, 1.0)
    w_flat = [torch.full((48, 64), 0.05)]  # every |x| and |w| alike: nothing to migrate, int8 already exact
    alpha, s, ratio = search_alpha(flat, flat.abs().amax(0), w_flat, AUTO_ALPHAS, "dynamic_per_token")
    assert alpha is None and s is None and ratio == 1


# all-INT4 weighs 0.211 MB and all-INT8 0.250 MB on the tiny model; all-INT4 costs ~0.05 % perplexity
@pytest.mark.parametrize(
    "budget", ["{max_size_mb: 0.23}", "{max_size_ratio: 1.09}", "{max_perplexity_increase_pct: 0.02}"]
)
def test_budget_raises_the_most_sensitive_layers_to_int8(tmp_path, tiny_llama, eval_text, budget):
    settings = f"{{method: rtn, group_size: 16, budget: {budget}, {cal(eval_text)}}}"
    run_dir = run(quant_recipe(tmp_path, tiny_llama, eval_text, settings), workdir=tmp_path / "a")
    folder = next(run_dir.glob("01-quantize-*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    sens, int8 = manifest["sensitivity_kl"], manifest["int8_layers"]
    assert len(sens) == 14 and all(v >= 0 for v in sens.values())
    assert 0 < len(int8) < 14
    assert all(manifest["plan"][n]["bits"] == 8 for n in int8)
    assert sum(1 for p in manifest["plan"].values() if p["bits"] == 4) == 14 - len(int8)
    if "max_size_mb" in budget:
        assert manifest["estimate"]["weight_mb"] <= 0.23
    elif "max_size_ratio" in budget:  # 1.09 times the all-INT4 size
        assert manifest["estimate"]["limit_mb"] == pytest.approx(0.23, abs=0.002)
        assert manifest["estimate"]["weight_mb"] <= manifest["estimate"]["limit_mb"]
    else:
        assert manifest["estimate"]["perplexity_increase_pct"] <= 0.02
    assert (folder / "sensitivity.png").stat().st_size > 1000


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied head; head tied to the embedding
def test_sensitivity_from_each_layers_input_equals_the_whole_forward(request, family):
    """Starting a candidate's forward at its own decoder layer gives the KL of the whole model's forward."""
    import torch.nn.functional as F

    from pipeline.quant.awq import fake_quant
    from pipeline.quant.primitives import QuantScheme
    from pipeline.stages.quantize.budget import sensitivities

    model = load_torch_model(request.getfixturevalue(f"tiny_{family}"))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = {n: QuantScheme(4, 16, False) for n in names}
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    fast = sensitivities(model, plan, ids)
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.double(), -1)
        for name in names:
            module = model.get_submodule(name)
            original = module.weight.data
            module.weight.data = fake_quant(original, plan[name])
            lp = F.log_softmax(model(ids).logits.double(), -1)
            module.weight.data = original
            slow = float((ref.exp() * (ref - lp)).sum(-1).mean())
            assert slow > 0, name  # every layer moves the output: the comparison means something
            assert fast[name] == pytest.approx(slow, rel=1e-3, abs=1e-12), name


def test_budget_below_the_int4_size_is_an_error(tmp_path, tiny_llama, eval_text):
    settings = f"{{method: rtn, group_size: 16, budget: {{max_size_mb: 0.01}}, {cal(eval_text)}}}"
    with pytest.raises(Exception, match=r"max_size_mb: 0.01 MB is below the all-INT4 size"):
        run(quant_recipe(tmp_path, tiny_llama, eval_text, settings), workdir=tmp_path / "a")


def test_budget_needs_exactly_one_limit(tmp_path, tiny_llama):
    with pytest.raises(
        RecipeError, match="set exactly one of max_size_mb, max_size_ratio, max_perplexity_increase_pct"
    ):
        load_recipe(quant_recipe(tmp_path, tiny_llama, None, "{method: rtn, budget: {}}"))


def test_size_estimate_matches_the_exported_artifact(tmp_path, tiny_qwen2, eval_text):
    """The budget's size estimate is the size the export really has (tied, shared INT4 head/embedding)."""
    from pipeline.quant.primitives import QuantScheme
    from pipeline.stages.quantize.budget import weight_bytes

    settings = f"{{method: rtn, group_size: 16, lm_head: int4, embedding: int4, {cal(eval_text)}}}"
    run_dir = run(quant_recipe(tmp_path, tiny_qwen2, eval_text, settings), workdir=tmp_path / "a")
    model = load_torch_model(tiny_qwen2)
    plan = {
        n: QuantScheme(4, 16, False)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (n.startswith("model.layers.") or n == "lm_head")
    }
    estimate = weight_bytes(model, plan, "shared")
    graph = onnx.load(str(find_model_folder(run_dir) / "model.onnx"))
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)
    assert 0.9 * stored < estimate <= stored  # the graph also stores norms, biases and small constants


def test_accuracy_level_is_set_after_the_float_parity_check(tmp_path, tiny_llama, eval_text):
    path = tmp_path / "acc.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        model: {{source: {tiny_llama}}}
        stages:
          - quantize: {{method: rtn, bits: 8, group_size: 16}}
          - export: {{accuracy_level: 4}}
        """)
    )
    export = find_model_folder(run(path, workdir=tmp_path / "a"))
    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    assert Generator(export).generate([[5, 6, 7]], 3, ignore_eos=True).tokens[0]


def test_int8_layers_can_take_their_own_accuracy_level(tmp_path, tiny_llama, eval_text):
    """INT4 body with float compute, INT8 layers with int8 compute, in both graphs."""
    path = tmp_path / "acc8.yaml"
    path.write_text(
        textwrap.dedent(f"""        model: {{source: {tiny_llama}}}
        stages:
          - quantize: {{method: rtn, bits: 4, group_size: 16, overrides: {{'mlp\\.down_proj': 8}}}}
          - export: {{accuracy_level: 0, int8_accuracy_level: 4}}
        """)
    )
    export = find_model_folder(run(path, workdir=tmp_path / "a"))
    for graph_file in (export / "model.onnx", export / "fused" / "model.onnx"):
        nodes = onnx.load(str(graph_file), load_external_data=False).graph.node
        levels = {
            (attrs["bits"], attrs["accuracy_level"])
            for n in nodes
            if n.op_type == "MatMulNBits"
            for attrs in [{a.name: a.i for a in n.attribute}]
        }
        assert levels == {(4, 0), (8, 4)}


def _levels(graph_file: Path) -> set[int]:
    nodes = onnx.load(str(graph_file), load_external_data=False).graph.node
    return {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}


def _export_with_auto_accuracy_level(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "auto.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        model: {{source: {model}}}
        stages:
          - quantize: {{method: rtn, bits: 4, group_size: 16}}
          - export: {{accuracy_level: auto}}
        """)
    )
    return find_model_folder(run(path, workdir=tmp_path / "a"))


@pytest.mark.parametrize("faster", [4, 0])
def test_accuracy_level_auto_keeps_the_level_that_decodes_faster(tmp_path, tiny_llama, monkeypatch, faster):
    """The export times the runner's graph with each level written into it (read back here from the file
    it runs) and sets the faster one on both graphs."""
    import runtime.tune

    seen = []

    def fake_measure(folder, settings, provider, graph, batch, prompt_tokens, steps):
        level = _levels(folder / "fused" / "model.onnx")
        assert len(level) == 1 and graph == "fused"
        seen.append(level.pop())
        return 50.0, 5.0 if seen[-1] == faster else 10.0

    monkeypatch.setattr(runtime.tune, "measure", fake_measure)
    export = _export_with_auto_accuracy_level(tmp_path, tiny_llama)
    assert seen == [0, 4, 4, 0, 0, 4]  # alternating rounds
    assert _levels(export / "model.onnx") == _levels(export / "fused" / "model.onnx") == {faster}
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["accuracy_level"] == faster and manifest["config"]["accuracy_level"] == "auto"
    assert manifest["accuracy_level_decode_ms"][str(faster)] == [5.0, 5.0, 5.0]


def test_accuracy_level_auto_measured_for_real_and_refused_when_misspelled(tmp_path, tiny_llama):
    export = _export_with_auto_accuracy_level(tmp_path, tiny_llama)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["accuracy_level"] in (0, 4)
    assert _levels(export / "fused" / "model.onnx") == {manifest["accuracy_level"]}
    assert all(len(t) == 3 and min(t) > 0 for t in manifest["accuracy_level_decode_ms"].values())
    assert Generator(export).generate([[5, 6, 7]], 3, ignore_eos=True).tokens[0]
    with pytest.raises(RecipeError, match="export.accuracy_level: 'fast' is not one of 0, 1, 2, 3, 4, auto"):
        build_config(ExportConfig, {"accuracy_level": "fast"}, "export")
    with pytest.raises(RecipeError, match="export.accuracy_level: auto times the CPU's arithmetic"):
        build_config(ExportConfig, {"accuracy_level": "auto", "dtype": "float16"}, "export")


def test_float_zero_points_for_4_bit_layers_and_a_head_the_embedding_does_not_share(tiny_llama, tiny_qwen2):
    cfg = QuantizeConfig(
        method="rtn", group_size=16, zero_point="float", overrides={r"mlp\.down_proj": 8}, lm_head="int4"
    )
    plan, _ = make_plan(load_torch_model(tiny_llama), cfg)
    assert plan["model.layers.0.mlp.up_proj"].float_zero and plan["lm_head"].float_zero
    assert not plan["model.layers.0.mlp.down_proj"].float_zero  # 8-bit integer zero points are fine-grained already
    # qwen2 ties the head to the embedding: shared codes go through GatherBlockQuantized, which takes integer zero points
    shared, _ = make_plan(
        load_torch_model(tiny_qwen2),
        QuantizeConfig(method="rtn", group_size=16, zero_point="float", lm_head="int4", embedding="int4"),
    )
    assert not shared["lm_head"].float_zero and shared["model.layers.0.mlp.up_proj"].float_zero


def test_float_zero_points_export_exactly_and_go_to_gguf_as_q4_1(tmp_path, tiny_llama, eval_text):
    import gguf
    from conftest import write_targets_recipe
    from safetensors.numpy import load_file

    from pipeline.formats.gguf import block_values, permute_rows
    from pipeline.quant.primitives import unpack_matmul_nbits

    quantize = f"{{method: gptq, group_size: 32, zero_point: float, lm_head: int4, {cal(eval_text)}}}"
    run_dir = run(
        write_targets_recipe(tmp_path, tiny_llama, eval_text, quantize, "[onnx, gguf]"), workdir=tmp_path / "a"
    )
    quant, export = next(run_dir.glob("*-quantize-*")), find_model_folder(run_dir)
    plan = json.loads((quant / "quant_plan.json").read_text())["layers"]
    assert all(spec.get("float_zero") for spec in plan.values())
    for graph_file in (export / "model.onnx", export / "fused" / "model.onnx"):
        graph = onnx.load(str(graph_file), load_external_data=False).graph
        corrections = [n for n in graph.node if n.name.endswith("/ZeroCorrection")]
        assert len(corrections) == len([n for n in graph.node if n.op_type == "MatMulNBits"]) > 0
    manifest = json.loads((export / "manifest.json").read_text())
    assert max(manifest["parity_by_graph"].values()) < 1e-3  # against the dequantized float-zero model
    packed = load_file(str(quant / "quantized.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(export / "gguf" / "model.gguf")).tensors}
    layer = "model.layers.1.self_attn.q_proj"
    q, scale, zero = (permute_rows(a, 4) for a in unpack_matmul_nbits(packed, layer, plan[layer]))
    t = tensors["blk.1.attn_q.weight"]
    assert t.tensor_type.name == "Q4_1"
    np.testing.assert_array_equal(
        gguf.quants.dequantize(np.array(t.data), t.tensor_type), block_values(q, scale, zero, t.tensor_type)
    )


def test_float_zero_points_into_compressed_tensors_are_refused_when_the_recipe_loads(tmp_path, tiny_llama, eval_text):
    from conftest import write_targets_recipe

    recipe = write_targets_recipe(
        tmp_path, tiny_llama, eval_text, "{method: rtn, zero_point: float}", "[onnx, hf-quantized]"
    )
    with pytest.raises(
        RecipeError, match=r"hf-quantized cannot hold zero_point: float .* \(gguf holds float zero points as Q4_1\)"
    ):
        load_recipe(recipe)
