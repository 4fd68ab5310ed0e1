"""`optimize serve ARTIFACT`: the OpenAI-compatible server over an exported artifact."""

from __future__ import annotations

import logging
import threading
import time

import click

from runtime import Generator, RuntimeFailure, find_model_folder

CUT_MARGIN_S = 1.0  # before the grace period ends, streams still running are ended by the scheduler


@click.command("serve")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--slots", default=8, show_default=True, type=click.IntRange(1), help="sequences decoded together (KV-cache rows)"
)
@click.option(
    "--max-length",
    default=2048,
    show_default=True,
    type=click.IntRange(2),
    help="positions per slot: prompt plus completion of one request",
)
@click.option(
    "--kv-budget-mb",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="cap on the KV cache; lowers --max-length to fit --slots in it",
)
@click.option(
    "--max-waiting",
    default=64,
    show_default=True,
    type=click.IntRange(0),
    help="queued requests beyond the slots; past it: 429",
)
@click.option(
    "--max-prefill-tokens",
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="prompt tokens prefilled between two decode steps; longer prompts are prefilled in chunks over several steps",
)
@click.option(
    "--prefix-reuse/--no-prefix-reuse",
    default=True,
    show_default=True,
    help="a prompt that starts like a cached sequence (system prompt, earlier turns) reuses its KV",
)
@click.option(
    "--float-prefill/--no-float-prefill",
    default=True,
    show_default=True,
    help="int8 KV cache: run prompts through the artifact's float-cache graph (faster prompts, one more "
    "session's memory) instead of the int8 graph",
)
@click.option("--model-name", default=None, help="the `model` clients send (default: the run folder's name)")
@click.option(
    "--provider",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: CUDA when onnxruntime offers it (the KV slots then live in GPU memory), else the CPU",
)
@click.option("--threads", default=0, type=click.IntRange(0), help="intra-op threads (0: onnxruntime decides)")
@click.option(
    "--spin/--no-spin",
    default=True,
    show_default=True,
    help="let idle onnxruntime threads spin between steps (faster steps, less CPU left for HTTP)",
)
@click.option(
    "--shutdown-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="seconds in-flight requests get to finish after SIGTERM",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
@click.option(
    "--verify",
    is_flag=True,
    help="hash every file of the artifact against its manifest first (sizes are always checked)",
)
@click.option(
    "--max-body-mb",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="largest request body taken; a larger one is refused (413) before it is read",
)
@click.option(
    "--api-key",
    envvar="OPTIMIZE_API_KEY",
    default=None,
    help="require 'Authorization: Bearer KEY' (or set OPTIMIZE_API_KEY)",
)
@click.option("--protect-probes", is_flag=True, help="with an API key, /health and /metrics need it too (else open)")
@click.option(
    "--allow-special-tokens",
    is_flag=True,
    help="read special-token text in chat messages as control tokens (by default it is plain text, so "
    "no client can forge a turn)",
)
def serve_command(
    artifact,
    host,
    port,
    slots,
    max_length,
    kv_budget_mb,
    max_waiting,
    max_prefill_tokens,
    prefix_reuse,
    float_prefill,
    model_name,
    provider,
    threads,
    spin,
    shutdown_timeout,
    log_level,
    verify,
    max_body_mb,
    api_key,
    protect_probes,
    allow_special_tokens,
):
    """Serve the model exported in ARTIFACT (a run folder or an export step folder) over HTTP."""
    import uvicorn

    from runtime.serve.app import Server, Settings, create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        folder = find_model_folder(artifact)
        # no CUDA graph: the server's batch changes from step to step, a captured graph has one shape
        gen = Generator(
            folder,
            provider=provider,
            threads=threads,
            graph="fused",
            cuda_graph=False,
            spinning=spin,
            float_prefill=float_prefill,
            verify=verify,
        )
        per_token = gen.contract.kv_bytes_per_token(slots)
        if kv_budget_mb is not None:
            fit = int(kv_budget_mb * 2**20 // per_token)
            if fit < 2:
                raise RuntimeFailure(
                    f"--kv-budget-mb {kv_budget_mb} holds {fit} positions per slot for {slots} slots; "
                    f"raise it or lower --slots"
                )
            max_length = min(max_length, fit)
        if gen.contract.max_positions:
            max_length = min(max_length, gen.contract.max_positions)
        name = model_name or _default_name(folder)
        if protect_probes and not api_key:
            raise RuntimeFailure("--protect-probes needs an API key (--api-key or OPTIMIZE_API_KEY)")
        server = Server(
            gen,
            Settings(
                slots,
                max_length,
                max_waiting,
                max_prefill_tokens,
                name,
                prefix_reuse,
                int(max_body_mb * 2**20),
                api_key or None,
                protect_probes,
                allow_special_tokens,
            ),
        )
        server.warm_up()
    except RuntimeFailure as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"[{folder}] {gen.flavour} graph on {gen.provider} ({gen.describe_settings()}); serving model '{name}'",
        err=True,
    )
    click.echo(
        f"KV cache ({gen.describe_kv()}): {slots} slots x {max_length} positions = "
        f"{server.slots.nbytes / 2**20:.1f} MiB preallocated in {'GPU' if server.slots.device == 'cuda' else 'host'} memory; queue: {max_waiting} waiting; prefill: {max_prefill_tokens} tokens per step; "
        f"prefix reuse {'on' if prefix_reuse else 'off'}",
        err=True,
    )
    config = uvicorn.Config(
        create_app(server),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,
        access_log=log_level == "debug",
    )
    graceful_server(config, server.scheduler, shutdown_timeout).run()


class _Graceful:
    """Mixed into uvicorn's Server (below): a shutdown asked for with SIGTERM or SIGINT that completes exits 0
    (uvicorn re-raises the signal afterwards: exit 143); new requests get 503 from the signal on; and streams
    still running CUT_MARGIN_S before the grace period ends are ended by the scheduler, each with an error
    event and [DONE], rather than cut mid-stream."""

    def __init__(self, config, scheduler, grace: float):
        super().__init__(config)
        self.scheduler, self.grace, self.draining = scheduler, grace, False

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
        if not self.draining:  # the scheduler's lock may be held by this very thread: act from another one
            self.draining = True
            threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _drain(self) -> None:
        self.scheduler.refuse_new()
        time.sleep(max(0.0, self.grace - CUT_MARGIN_S))
        self.scheduler.stop()


def graceful_server(config, scheduler, grace: float):
    """uvicorn.Server with _Graceful's shutdown (uvicorn is imported only when serving)."""
    import uvicorn

    return type("GracefulServer", (_Graceful, uvicorn.Server), {})(config, scheduler, grace)


def _default_name(folder) -> str:
    """The run's name (artifacts/<run>/<NN-export-…>), or the folder's own name."""
    parent = folder.parent
    return parent.name if (parent / "run.json").is_file() else folder.name
