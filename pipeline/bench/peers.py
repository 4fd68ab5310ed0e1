"""The same work through the engines users would otherwise pick. Each is optional: one that is not
installed (or cannot run this artifact) is reported as skipped, with why and how to install it.

    transformers (PyTorch, eager and sdpa attention) on the export's source checkpoint
    optimum ORTModelForCausalLM on our portable graph
    onnxruntime-genai on its own model builder's output for the same checkpoint and precision
    llama.cpp (llama-cpp-python) on the export's GGUF target, else on the GGUF the model came from
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.bench.workload import Workload, warm_up_gpu

INSTALL = {
    "transformers": "pip install torch transformers",
    "optimum": "pip install 'llm-optimize[pipeline,cpu,optimum]'  # optimum-onnx 0.1 needs transformers<4.58",
    "onnxruntime-genai": "pip install 'onnxruntime-genai>=0.18,<0.19'  # its builder must match our transformers",
    "llama.cpp": "pip install llama-cpp-python  # builds llama.cpp from source",
}


@dataclass
class PeerInputs:
    export: Path  # our export artifact (portable graph at its root)
    checkpoint: Path | None  # the HF checkpoint the export was made from
    gguf: Path | None  # the export's GGUF target, else the GGUF the model came from, if any
    quantized: bool  # the artifact's linear layers are INT4/INT8 (MatMulNBits)
    work: Workload
    threads: int
    cache_dir: Path  # where peers' own model builds are kept between bench runs
    device: str = "cpu"  # "cuda" when ours ran on the CUDA provider: peers that can, run on the GPU too
    int4_symmetric: bool = True  # our INT4 layout, which the onnxruntime-genai build copies
    int4_block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute: 4 int8, 0 float


def skipped(engine: str, why: str) -> dict:
    return {"engine": engine, "status": "skipped", "reason": why, "install": INSTALL.get(engine.split(" ")[0])}


def time_generation(
    first_token: Callable[[list[list[int]]], object],
    next_token: Callable[[object], None],
    work: Workload,
    gpu: bool = False,
) -> dict:
    """TTFT per prompt length (batch 1) and decode tok/s per batch size, for an engine given as
    `first_token(prompts) -> state` (prefill + first token) and `next_token(state)` (one more).
    `gpu`: keep the device busy for a second first (see warm_up_gpu)."""
    out: dict = {"ttft_ms": {}, "decode_tok_s": {}, "decode_ms_per_step": {}}
    if gpu:
        warm_up_gpu(lambda: first_token([work.prompt(work.prompt_lengths[0])]))
    for length in work.prompt_lengths:
        times = []
        for i in range(work.warmup + work.repeats):
            t = time.perf_counter()
            first_token([work.prompt(length)])
            if i >= work.warmup:
                times.append(time.perf_counter() - t)
        out["ttft_ms"][length] = statistics.median(times) * 1000
    for batch in work.batches:
        prompts = work.batch(batch)
        rates, steps = [], []
        try:
            for i in range(work.warmup + work.repeats):
                state = first_token(prompts)
                t = time.perf_counter()
                for _ in range(work.new_tokens - 1):
                    next_token(state)
                seconds = time.perf_counter() - t
                if i >= work.warmup:
                    rates.append(batch * (work.new_tokens - 1) / seconds)
                    steps.append(seconds / (work.new_tokens - 1) * 1000)
        except Exception as err:  # one batch size the engine refuses leaves the others measured
            out.setdefault("errors", {})[batch] = f"{type(err).__name__}: {str(err)[:300]}"
            continue
        out["decode_tok_s"][batch] = statistics.median(rates)
        out["decode_ms_per_step"][batch] = statistics.median(steps)
    return out


def bench_transformers(inp: PeerInputs, attention: str) -> dict:
    """PyTorch through transformers: float32 on the CPU, float16 on the GPU (as a user would run it).
    Without the source checkpoint (an export copied alone to a GPU machine), the model is built from
    the export's config.json with random weights: the same shapes and work, so the same speed; the
    result says so."""
    engine = f"transformers {attention}"
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return skipped(engine, "transformers or torch is not installed")
    if inp.checkpoint is None and not (inp.export / "config.json").is_file():
        return skipped(engine, "the export's source checkpoint was not found beside it")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    if inp.threads:
        torch.set_num_threads(inp.threads)
    gpu = inp.device == "cuda"
    if gpu and not torch.cuda.is_available():
        return skipped(engine, "torch sees no CUDA device")
    dtype = torch.float16 if gpu else torch.float32
    t = time.perf_counter()
    if inp.checkpoint is not None:
        model = AutoModelForCausalLM.from_pretrained(inp.checkpoint, dtype=dtype, attn_implementation=attention)
        weights = "checkpoint"
    else:
        config = AutoConfig.from_pretrained(inp.export)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(dtype)
        weights = "random, from config.json (speed only)"
    model = model.to(inp.device).eval()
    load_s = time.perf_counter() - t

    def sync():
        if gpu:
            torch.cuda.synchronize()  # a real decode loop waits for each token; so does ours

    @torch.no_grad()
    def first_token(prompts):
        ids = torch.tensor(prompts, device=inp.device)
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        state = {"cache": out.past_key_values, "next": out.logits[:, -1].argmax(-1, keepdim=True)}
        sync()
        return state

    @torch.no_grad()
    def next_token(state):
        out = model(input_ids=state["next"], past_key_values=state["cache"], use_cache=True)
        state["next"] = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()

    result = time_generation(first_token, next_token, inp.work, gpu=gpu)
    return {
        "engine": engine,
        "status": "ok",
        "precision": "fp16" if gpu else "fp32",
        "device": inp.device,
        "weights": weights,
        "load_s": load_s,
        **result,
    }


def bench_optimum(inp: PeerInputs) -> dict:
    engine = "optimum ORTModelForCausalLM"
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.onnxruntime") is None:
        return skipped("optimum", "optimum-onnx is not installed")
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    opts = ort.SessionOptions()
    if inp.threads:
        opts.intra_op_num_threads = inp.threads
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(inp.export, use_cache=True, use_io_binding=False, session_options=opts)
    load_s = time.perf_counter() - t

    def step(ids, mask, cache):
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    def first_token(prompts):
        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)
        nxt, cache = step(ids, mask, None)
        return {"next": nxt, "cache": cache, "mask": mask}

    def next_token(state):
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["next"])], dim=1)
        state["next"], state["cache"] = step(state["next"], state["mask"], state["cache"])

    result = time_generation(first_token, next_token, inp.work)
    return {
        "engine": engine,
        "status": "ok",
        "precision": "int4/int8" if inp.quantized else "fp32",
        "load_s": load_s,
        **result,
    }


def _genai_int4_options(inp: PeerInputs) -> dict[str, str]:
    """The builder options that give onnxruntime-genai our INT4 layout: symmetry and block size, and
    on the CPU the MatMulNBits compute (its defaults are symmetric, 32, int8 compute)."""
    options = {"is_symmetric": str(inp.int4_symmetric).lower(), "block_size": str(inp.int4_block_size)}
    if inp.device == "cpu":
        options["accuracy_level"] = str(inp.accuracy_level)
    return options


def bench_genai(inp: PeerInputs, cuda_graph: bool = False) -> dict:
    """onnxruntime-genai on its builder's model for the same checkpoint: float32 or INT4 on the CPU,
    INT4 (float16 compute) on the CUDA provider. A build found in the cache is reused, so a model
    built on one machine can be copied with the export to a GPU machine that lacks the checkpoint."""
    engine = "onnxruntime-genai" + (" cuda-graph" if cuda_graph else "")
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return skipped(engine, "onnxruntime-genai is not installed")
    gpu = inp.device == "cuda"
    if cuda_graph and not gpu:
        return {"engine": engine, "status": "skipped", "reason": "CUDA graphs need ours on the CUDA provider"}
    precision = "int4" if inp.quantized else ("fp16" if gpu else "fp32")
    options = _genai_int4_options(inp) if inp.quantized else {}
    layout = "".join(f"-{k}-{v}" for k, v in options.items())
    folder = inp.cache_dir / (f"genai-{precision}{layout}" + ("-cuda" if gpu else ""))
    if not (folder / "genai_config.json").is_file():
        if inp.checkpoint is None:
            return skipped(engine, f"no build in {folder} and the export's source checkpoint was not found beside it")
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(inp.checkpoint),
            "-o",
            str(folder),
            "-p",
            precision,
            "-e",
            inp.device,
            "-c",
            str(inp.cache_dir / "genai-cache"),
        ]
        if options:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode != 0:
            last = (built.stderr.strip().splitlines() or ["no output"])[-1]
            return {"engine": engine, "status": "failed", "reason": f"model builder failed: {last[:300]}"}
    _set_genai_threads(folder / "genai_config.json", inp.threads)
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    if gpu:
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1" if cuda_graph else "0")
    t = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - t
    work = inp.work

    def first_token(prompts):
        params = og.GeneratorParams(model)
        longest = max(len(p) for p in prompts)
        params.set_search_options(
            max_length=longest + work.new_tokens, min_length=longest + work.new_tokens, batch_size=len(prompts)
        )
        gen = og.Generator(model, params)
        gen.append_tokens(prompts)
        gen.generate_next_token()
        gen.get_next_tokens()
        return gen

    def next_token(gen):
        gen.generate_next_token()
        gen.get_next_tokens()  # a streaming loop reads each token back, as ours does; on CUDA this waits for it

    result = time_generation(first_token, next_token, work, gpu=gpu)  # a refused batch size is recorded there
    return {
        "engine": engine,
        "status": "ok",
        "precision": precision,
        "device": inp.device,
        "load_s": load_s,
        "model_dir": str(folder),
        "builder_options": options,
        **result,
    }


def _set_genai_threads(path: Path, threads: int) -> None:
    """onnxruntime-genai reads its session options from genai_config.json."""
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if threads:
        options["intra_op_num_threads"] = threads
    else:
        options.pop("intra_op_num_threads", None)
    path.write_text(json.dumps(config, indent=2))


def bench_llama_cpp(inp: PeerInputs) -> dict:
    engine = "llama.cpp"
    if importlib.util.find_spec("llama_cpp") is None:
        return skipped(engine, "llama-cpp-python is not installed")
    if inp.gguf is None or not inp.gguf.is_file():
        return skipped(engine, "no GGUF of these weights: export with `targets: [onnx, gguf]`")
    from llama_cpp import Llama

    work = inp.work
    t = time.perf_counter()
    llm = Llama(
        model_path=str(inp.gguf),
        n_ctx=max(*work.prompt_lengths, work.decode_prompt) + work.new_tokens + 8,
        n_threads=inp.threads or None,
        verbose=False,
        logits_all=False,
    )
    load_s = time.perf_counter() - t

    def first_token(prompts):
        if len(prompts) > 1:
            raise NotImplementedError
        llm.reset()
        llm.eval(prompts[0])
        return {"next": llm.sample(temp=0.0)}

    def next_token(state):
        llm.eval([state["next"]])
        state["next"] = llm.sample(temp=0.0)

    single = Workload(
        work.tokens, work.prompt_lengths, (1,), work.decode_prompt, work.new_tokens, 0, work.warmup, work.repeats
    )
    result = time_generation(first_token, next_token, single)
    return {
        "engine": engine,
        "status": "ok",
        "precision": _gguf_type(inp.gguf),
        "load_s": load_s,
        "note": "batch 1 only (llama-cpp-python's high-level API decodes one sequence)",
        **result,
    }


def _gguf_type(path: Path) -> str:
    """The file's most common weight type, e.g. Q4_1 (read from the tensors, not the file name)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) > 1:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return max(counts, key=counts.get) if counts else "gguf"


PEERS = {
    "transformers-eager": lambda inp: bench_transformers(inp, "eager"),
    "transformers-sdpa": lambda inp: bench_transformers(inp, "sdpa"),
    "optimum": bench_optimum,
    "onnxruntime-genai": bench_genai,
    "onnxruntime-genai-cuda-graph": lambda inp: bench_genai(inp, cuda_graph=True),
    "llama.cpp": bench_llama_cpp,
}
# those that follow ours onto the GPU
GPU_PEERS = ("transformers-eager", "transformers-sdpa", "onnxruntime-genai", "onnxruntime-genai-cuda-graph")
