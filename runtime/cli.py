"""`optimize generate ARTIFACT PROMPT`: stream an answer through the bundled ONNX Runtime runner;
`optimize tune ARTIFACT`: measure the runner's session settings on this machine."""

from __future__ import annotations

import sys
import time

import click

from runtime import Generator, RuntimeFailure, SamplingParams, find_model_folder
from runtime.generate import GRAPHS
from runtime.settings import SessionSettings
from runtime.tokenizer import StreamDecoder


@click.command("generate")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=None, type=int)
@click.option("--system", default=None, help="system message for the chat template")
@click.option("--no-chat", is_flag=True, help="plain completion: do not apply the chat template")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", default=0, type=click.IntRange(0), help="intra-op threads (0: onnxruntime decides)")
@click.option(
    "--graph",
    type=click.Choice(GRAPHS),
    default="auto",
    show_default=True,
    help="auto: the fused graph when the artifact has one",
)
@click.option(
    "--max-length",
    default=None,
    type=click.IntRange(2),
    help="KV cache positions of the fused graph (default: prompt plus --max-new-tokens)",
)
@click.option("--allow-fallback", is_flag=True, help="run even if heavy nodes fell back from the GPU to the CPU")
@click.option(
    "--cuda-graph/--no-cuda-graph",
    default=None,
    help="capture the decode step as a CUDA graph and replay it (default: on with cuda and the fused graph)",
)
@click.option(
    "--verify",
    is_flag=True,
    help="hash every file of the artifact against its manifest first (sizes are always checked)",
)
def generate_command(
    artifact,
    prompt,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    system,
    no_chat,
    provider,
    threads,
    graph,
    max_length,
    allow_fallback,
    cuda_graph,
    verify,
):
    """Answer PROMPT with the model exported in ARTIFACT (a run folder or an export step folder)."""
    try:
        t0 = time.perf_counter()
        folder = find_model_folder(artifact)
        gen = Generator(
            folder,
            provider=provider,
            threads=threads,
            graph=graph,
            max_length=max_length,
            allow_fallback=allow_fallback,
            cuda_graph=cuda_graph,
            verify=verify,
        )
        load_s = time.perf_counter() - t0
        click.echo(
            f"[{folder}] {gen.flavour} graph on {gen.provider}, loaded in {load_s:.2f}s; {gen.describe_settings()}",
            err=True,
        )
        ids = gen.tokenizer.encode(prompt) if no_chat else gen.tokenizer.encode_chat(prompt, system)
        if gen.flavour == "fused":
            positions = max_length or len(ids) + max_new_tokens
            click.echo(
                f"KV cache ({gen.describe_kv()}): {gen.contract.kv_bytes_per_token() * positions / 2**20:.1f} MiB "
                f"({positions} positions, preallocated)",
                err=True,
            )
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stream = StreamDecoder(gen.tokenizer)
        result = gen.generate([ids], max_new_tokens, params, on_token=lambda _row, t: _emit(stream.push(t)))
    except (RuntimeFailure, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo("")
    n = len(result.tokens[0])
    click.echo(
        f"[{gen.provider}] {len(ids)} prompt tokens, {n} new ({result.finish_reasons[0]}); "
        f"time to first token {result.prefill_seconds * 1000:.0f} ms, decode {result.decode_tokens_per_second:.1f} tokens/s",
        err=True,
    )


def _emit(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@click.command("tune")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--graph", type=click.Choice(GRAPHS), default="auto", show_default=True)
@click.option(
    "--batch",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="rows decoded together (a server's busy batch: its --slots)",
)
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=64, show_default=True, type=click.IntRange(2), help="timed decode steps per candidate")
@click.option(
    "--rounds",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="passes over the candidates (alternately forward and backward); the median counts",
)
def tune_command(artifact, provider, graph, batch, prompt_tokens, steps, rounds):
    """Measure intra-op threads and the graph optimization level for ARTIFACT on this machine; generate,
    bench, serve and validate then use the fastest (unless given --threads)."""
    from runtime.tune import tune

    try:
        folder = find_model_folder(artifact)
        click.echo(
            f"[{folder}] tuning the runner's session: batch {batch}, {prompt_tokens}-token prompt, {steps} decode steps"
        )
        result = tune(folder, provider, graph, batch, prompt_tokens, steps, rounds, log=click.echo)
    except (RuntimeFailure, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo("| intra-op threads | graph optimization | decode ms/step (median) | prefill ms (median) |")
    click.echo("|---|---|---|---|")
    for c in sorted(result["candidates"], key=lambda c: c["decode_ms_median"]):
        threads = c["threads"] or "onnxruntime's"
        click.echo(f"| {threads} | {c['optimization']} | {c['decode_ms_median']:.2f} | {c['prefill_ms_median']:.1f} |")
    click.echo(
        f"chosen: {SessionSettings(**result['chosen']).describe()} "
        f"({result['decode_speedup_vs_default']:.2f}x the defaults' decode speed); written to {result['file']}"
    )
