"""`optimize bench ARTIFACT [--compare]`: our runner's speed and memory, and the peers' on the same work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from calibration.datasets import DataError
from pipeline.bench import peers as peer_mod
from pipeline.bench.ours import measure_ours
from pipeline.bench.report import table, write
from pipeline.bench.system import envelope
from pipeline.bench.workload import make_workload
from pipeline.configs import ExportConfig, QuantizeConfig
from runtime import RuntimeFailure, find_model_folder
from runtime.generate import GRAPHS
from runtime.tokenizer import Tokenizer


def _ints(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,4,8") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers, e.g. 1,4,8")
    return out


@click.command("bench")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--compare", is_flag=True, help="also run the installed peers on the same work")
@click.option(
    "--peers",
    "peer_names",
    default=",".join(peer_mod.PEERS),
    show_default=True,
    help="peers for --compare, comma-separated",
)
@click.option("--prompt-lengths", default="128,512,1024", show_default=True, help="TTFT prompt lengths (tokens)")
@click.option("--batches", default="1,4,8", show_default=True, help="decode batch sizes")
@click.option(
    "--new-tokens",
    default=128,
    show_default=True,
    type=click.IntRange(2),
    help="new tokens per decode run (EOS ignored)",
)
@click.option(
    "--long-tokens", default=1000, show_default=True, type=click.IntRange(16), help="tokens of the memory-flatness run"
)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0))
@click.option(
    "--text", default="wikitext-2", show_default=True, help="prompt text: a built-in corpus or a text file (test split)"
)
@click.option("--threads", default=0, type=click.IntRange(0), help="intra-op threads (0: onnxruntime decides)")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--graph", type=click.Choice(GRAPHS), default="auto", show_default=True)
@click.option(
    "--cuda-graph/--no-cuda-graph",
    default=None,
    help="ours: capture the decode step as a CUDA graph (default: on with cuda and the fused graph)",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="where bench.json and bench.png go (default: <run folder>/bench/<export step>)",
)
def bench_command(
    artifact,
    compare,
    peer_names,
    prompt_lengths,
    batches,
    new_tokens,
    long_tokens,
    repeats,
    warmup,
    text,
    threads,
    provider,
    graph,
    cuda_graph,
    out,
):
    """Measure ARTIFACT (a run folder or an export step): TTFT, decode tokens/s, memory, load time."""
    provenance = envelope("")  # the code as the bench starts
    try:
        folder = find_model_folder(artifact)
        names = [n.strip() for n in peer_names.split(",") if n.strip()]
        unknown = sorted(set(names) - set(peer_mod.PEERS))
        if unknown:
            raise click.BadParameter(
                f"unknown peer {unknown[0]!r}; choose from {', '.join(peer_mod.PEERS)}", param_hint="--peers"
            )
        out = out or folder.parent / "bench" / folder.name
        work = make_workload(
            Tokenizer(folder),
            text,
            prompt_lengths=_ints(prompt_lengths),
            batches=_ints(batches),
            new_tokens=new_tokens,
            long_tokens=long_tokens,
            repeats=repeats,
            warmup=warmup,
        )
        click.echo(
            f"bench {folder}: prompts {work.prompt_lengths}, batches {work.batches}, {new_tokens} new tokens, "
            f"{warmup} warm-up + {repeats} repeats"
        )
        results = [measure_ours(folder, work, provider, threads, graph, log=click.echo, cuda_graph=cuda_graph)]
        if compare:
            inputs = _peer_inputs(folder, work, threads, out)
            if results[0]["provider"] == "CUDAExecutionProvider":
                inputs.device = "cuda"
            for name in names:
                click.echo(f"  {name} ...")
                started = time.perf_counter()
                try:
                    if inputs.device == "cuda" and name not in peer_mod.GPU_PEERS:
                        results.append(peer_mod.skipped(name, "its GPU run is not wired into the bench yet"))
                    else:
                        results.append(peer_mod.PEERS[name](inputs))
                except Exception as e:  # a peer's failure is reported, never fatal to the bench
                    results.append({"engine": name, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:300]})
                click.echo(f"    {results[-1].get('status', 'ok')} in {time.perf_counter() - started:.0f}s")
    except (RuntimeFailure, ValueError, DataError) as e:
        raise click.ClickException(str(e)) from None
    payload = {
        "artifact": str(folder),
        "artifact_name": f"{folder.parent.name}/{folder.name}",
        **provenance,
        "workload": {k: v for k, v in work.__dict__.items() if k != "tokens"},
        "threads": threads,
        "results": results,
    }
    click.echo(table(results, work))
    ours = results[0]
    click.echo(
        f"ours: KV cache {ours['kv_bytes_per_token'] / 1024:.1f} KiB/token; peak RSS {ours['peak_rss_mb']:.0f} MiB; "
        f"RSS growth over {ours['long_generation_tokens']} tokens {ours['rss_growth_mb']:+.1f} MiB; "
        f"time outside session.run at batch 1 {ours['outside_run_pct'].get(1, float('nan')):.1f} %; "
        f"bandwidth bound {ours['bandwidth_bound_tok_s']:.0f} tok/s ({ours['read_bandwidth_gbs']:.1f} GB/s over "
        f"{ours['weight_bytes'] / 1e6:.0f} MB), reached {ours['bandwidth_bound_fraction'] * 100:.0f} %"
        + (f"; GPU memory {ours['gpu_memory_mb']:.0f} MiB" if "gpu_memory_mb" in ours else "")
    )
    json_path, png_path = write(out, payload)
    click.echo(f"wrote {json_path}" + (f" and {png_path}" if png_path else " (no chart: matplotlib is not installed)"))


def _peer_inputs(folder: Path, work, threads: int, out: Path) -> peer_mod.PeerInputs:
    """The export's source checkpoint, and its GGUF target (else the GGUF the model came from), found
    through the manifests' parent links."""
    from pipeline.formats.gguf import GGUF_FILE, GGUF_FOLDER  # here: the gguf package only matters to --compare

    checkpoint = gguf = None
    manifest = _manifest(folder)
    # a setting missing from a manifest is the stage's default (pipeline.configs)
    # (the level the export chose: `auto` is measured there)
    layout: dict = {
        "accuracy_level": manifest.get(
            "accuracy_level", manifest.get("config", {}).get("accuracy_level", ExportConfig.accuracy_level)
        )
    }
    run_folder = folder.parent
    parent = manifest.get("parent")
    while parent:
        step = next((p for p in run_folder.glob(f"*-{parent[:12]}") if (p / "manifest.json").is_file()), None)
        if step is None:
            break
        m = _manifest(step)
        if m.get("kind") == "hf-model" and checkpoint is None:
            checkpoint = step
        if m.get("stage") == "quantize" and "int4_symmetric" not in layout:
            layout["int4_symmetric"] = m["config"].get("symmetric", QuantizeConfig.symmetric)
            layout["int4_block_size"] = m["config"].get("group_size", QuantizeConfig.group_size)
        if m.get("source", {}).get("kind") == "gguf":
            gguf = Path(m["source"]["location"])
        parent = m.get("parent")
    quantized = manifest.get("io_contract", {}).get("weights", "float") != "float"
    own = folder / GGUF_FOLDER / GGUF_FILE
    if own.is_file():  # the export's own GGUF: llama.cpp runs the very weights ours runs
        gguf = own
    return peer_mod.PeerInputs(
        export=folder,
        checkpoint=checkpoint,
        gguf=gguf,
        quantized=quantized,
        work=work,
        threads=threads,
        cache_dir=out.parent / "peers",
        **layout,
    )


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}
