"""`optimize bench` on a tiny run: our runner's figures, the peers on the same work, JSON and PNG."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import main


def test_bench_writes_json_and_chart_with_peers(tiny_run, eval_text, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_run),
            "--text",
            str(eval_text),
            "--prompt-lengths",
            "8,16",
            "--batches",
            "1,2",
            "--new-tokens",
            "5",
            "--long-tokens",
            "40",
            "--repeats",
            "1",
            "--out",
            str(out),
            "--compare",
            "--peers",
            "transformers-sdpa,optimum,onnxruntime-genai,llama.cpp",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 1000
    ours, *peers = payload["results"]
    assert ours["engine"] == "ours" and ours["graph"] == "fused"
    assert set(ours["ttft_ms"]) == {"8", "16"} and all(v > 0 for v in ours["ttft_ms"].values())
    assert set(ours["decode_tok_s"]) == {"1", "2"} and all(v > 0 for v in ours["decode_tok_s"].values())
    assert ours["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # layers, k+v, kv heads, head_dim, float32
    assert ours["rss_growth_mb"] < 5 and 0 <= ours["outside_run_pct"]["1"] <= 100
    on_disk = sum(p.stat().st_size for p in (Path(payload["artifact"]) / "fused").glob("model.onnx*"))
    assert 0 < ours["weight_bytes"] < on_disk  # the embedding table is gathered from, not read in full
    assert ours["read_bandwidth_gbs"] > 0 and ours["bandwidth_bound_fraction"] > 0
    assert payload["machine"]["cores"] and payload["machine"]["versions"]["onnxruntime"]
    by_engine = {p["engine"]: p for p in peers}
    assert by_engine["transformers sdpa"]["status"] == "ok"
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.onnxruntime"):
        optimum = by_engine["optimum ORTModelForCausalLM"]
        assert optimum["status"] == "ok" and optimum["decode_tok_s"]["2"] > 0, optimum
    else:  # the current stack: optimum-onnx needs transformers<4.58
        optimum = by_engine["optimum"]
        assert optimum["status"] == "skipped" and "optimum-onnx" in optimum["reason"], optimum
        assert "transformers<4.58" in optimum["install"]
    genai = by_engine["onnxruntime-genai"]
    assert genai["status"] == ("ok" if importlib.util.find_spec("onnxruntime_genai") else "skipped"), genai
    llama = by_engine["llama.cpp"]
    if importlib.util.find_spec("llama_cpp") is None:
        assert llama["status"] == "skipped" and "pip install" in llama["install"]
    else:  # the tiny model came from a checkpoint and was exported without a GGUF target
        assert llama["status"] == "skipped" and "targets: [onnx, gguf]" in llama["reason"]
    assert "| ours (fused) |" in result.output


def test_bench_rejects_unknown_peer_and_bad_lists(tiny_run):
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--compare", "--peers", "vllm"])
    assert result.exit_code != 0 and "unknown peer 'vllm'" in result.output
    result = CliRunner().invoke(main, ["bench", str(tiny_run), "--batches", "1,x"])
    assert result.exit_code != 0 and "comma-separated list of integers" in result.output


def test_a_batch_size_an_engine_refuses_is_recorded_and_the_others_measured():
    from pipeline.bench.peers import time_generation
    from pipeline.bench.workload import Workload

    def first_token(prompts):
        if len(prompts) > 1:
            raise RuntimeError("batch_size must be 1")
        return {}

    work = Workload(list(range(64)), (8,), (1, 2), 8, 3, 0, 0, 1)
    out = time_generation(first_token, lambda state: None, work)
    assert set(out["decode_tok_s"]) == {1} and out["decode_tok_s"][1] > 0
    assert out["errors"] == {2: "RuntimeError: batch_size must be 1"}


def test_report_labels_say_graph_and_cuda_graph():
    from pipeline.bench.report import label

    assert label({"engine": "ours", "graph": "fused", "cuda_graph": True}) == "ours (fused, CUDA graph)"
    assert label({"engine": "ours", "graph": "portable", "cuda_graph": False}) == "ours (portable)"
    assert label({"engine": "onnxruntime-genai"}) == "onnxruntime-genai"


def test_on_a_gpu_the_engine_is_kept_busy_before_time_to_first_token():
    from pipeline.bench.peers import time_generation
    from pipeline.bench.workload import Workload

    calls = []
    work = Workload(list(range(64)), (8,), (1,), 8, 2, 0, 1, 1)
    time_generation(lambda prompts: calls.append(len(prompts[0])), lambda state: None, work, gpu=True)
    assert len(calls) > 2 * (work.warmup + work.repeats) + 10  # a second of prefills before the timed ones


def test_genai_is_built_in_our_int4_layout(tiny_llama, eval_text, tmp_path):
    """The onnxruntime-genai peer gets our INT4 layout (symmetry, block size, compute), not its
    builder's defaults (symmetric, 32, int8), so the speed comparison is like against like."""
    import onnx

    from pipeline import run
    from pipeline.bench.cli import _peer_inputs
    from pipeline.bench.peers import _genai_int4_options, bench_genai
    from pipeline.bench.report import precision
    from pipeline.bench.workload import make_workload
    from runtime import find_model_folder
    from runtime.tokenizer import Tokenizer

    recipe = tmp_path / "asym.yaml"
    recipe.write_text(
        f"name: asym\nmodel: {{source: {tiny_llama}}}\nstages:\n"
        "  - quantize: {method: rtn, bits: 4, group_size: 16, symmetric: false}\n"
        "  - export: {accuracy_level: 4}\n"
    )
    export = find_model_folder(run(recipe, workdir=tmp_path))
    work = make_workload(
        Tokenizer(export), str(eval_text), prompt_lengths=(8,), batches=(1,), new_tokens=3, long_tokens=10, repeats=1
    )
    inp = _peer_inputs(export, work, threads=1, out=tmp_path / "bench" / "bench.json")
    assert (inp.quantized, inp.int4_symmetric, inp.int4_block_size, inp.accuracy_level) == (True, False, 16, 4)
    assert _genai_int4_options(inp) == {
        "is_symmetric": "false",
        "block_size": "16",
        "accuracy_level": "4",
    }
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return
    result = bench_genai(inp)
    assert result["status"] == "ok", result
    assert result["builder_options"]["is_symmetric"] == "false"  # recorded in bench.json
    assert precision(result) == "int4 asym g16 acc4"  # and in the table
    built = next(inp.cache_dir.glob("genai-int4-is_symmetric-false-block_size-16-accuracy_level-4/*.onnx"))
    nbits = [n for n in onnx.load(str(built), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["block_size"] == 16 and attrs["accuracy_level"] == 4
    assert all(len(n.input) >= 4 and n.input[3] for n in nbits)  # zero points: asymmetric
