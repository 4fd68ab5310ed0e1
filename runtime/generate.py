"""Prefill and decode through ONNX Runtime, with the KV cache carried between steps.

    prompts ──pad──► prefill ──► last logits ──► sample ──► decode (1 token per row) ──┐
                                      ▲                                              │
                                      └──────────── logits ◄─────────────────────────┘

An artifact holds a portable graph (optimum's layout) and, when exported with `fused: true`, a
fused one in `fused/` (GroupQueryAttention, in-place KV cache): the Generator takes the fused
graph when there is one. A batch of prompts of different lengths is decoded together; a sequence
that ends (EOS or its token limit) stops while the rest go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import RuntimeFailure
from runtime.float_prefill import FloatPrefill
from runtime.fused import FusedGraph
from runtime.integrity import check_artifact
from runtime.io_spec import CONTRACT_FILE, Contract
from runtime.placement import check_placement
from runtime.portable import PortableGraph
from runtime.sampling import SamplingParams, sample
from runtime.session import PROVIDERS, choose_provider, create_session
from runtime.settings import SessionSettings, load_tuned
from runtime.tokenizer import Tokenizer

GRAPHS = ("auto", "fused", "portable")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each prompt, EOS excluded
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    decode_session_seconds: float = 0.0  # of decode_seconds, the time inside session.run
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


class Generator:
    """An exported artifact, ready to generate.

    Example:
        >>> g = Generator("artifacts/smollm2-fp32/01-export-…")             # doctest: +SKIP
        >>> ids = g.tokenizer.encode_chat("What is the capital of France?")  # doctest: +SKIP
        >>> g.tokenizer.decode(g.generate([ids], max_new_tokens=20).tokens[0])  # doctest: +SKIP
    """

    def __init__(
        self,
        folder: Path | str,
        provider: str = "auto",
        threads: int = 0,
        graph: str = "auto",
        max_length: int | None = None,
        allow_fallback: bool = False,
        cuda_graph: bool | None = None,
        spinning: bool = True,
        verify_placement: bool = True,
        optimization: str | None = None,
        float_prefill: bool = True,
        verify: bool = False,
    ):
        """`threads` and `optimization` (graph optimization level): given neither, the settings
        `optimize tune` measured for this artifact on this machine, else onnxruntime's defaults
        (`settings` and `tuning_file` say which). `cuda_graph`: capture the decode step once and
        replay it; None (the default) does so on CUDA with the fused graph. `verify_placement`: off
        the CPU, profile one probe run and fail if a heavy node left the provider (unless `allow_fallback`).
        `float_prefill`: with an int8 KV cache, run prompts through the artifact's float-cache graph
        (runtime.float_prefill: faster prompts, a second session's memory) rather than the int8 graph.
        The artifact's files are checked against its manifest first: sizes always, checksums with `verify`."""
        self.folder = Path(folder)
        check_artifact(self.folder, verify)
        graph_folder = runner_graph_folder(self.folder, graph)
        self.contract = load_contract(graph_folder)
        self.provider_reason: str | None = None  # why "auto" left a GPU unused, for the log lines
        if (
            provider == "auto"
            and choose_provider("auto") == "cuda"
            and self.contract.flavour == "fused"
            and self.contract.dtype != "float16"
        ):
            provider = "cpu"
            self.provider_reason = (
                "auto took the CPU: this fused graph is float32, and CUDA's GroupQueryAttention runs "
                "float16 only (export with `dtype: float16` for the GPU)"
            )
        if cuda_graph is None:
            cuda_graph = self.contract.flavour == "fused" and choose_provider(provider) == "cuda"
        if cuda_graph and self.contract.flavour != "fused":
            raise RuntimeFailure("cuda_graph needs the fused graph (the portable graph's shapes change every step)")
        self.cuda_graph = cuda_graph
        self.settings, self.tuning_file = SessionSettings(threads, optimization or SessionSettings.optimization), None
        self._settings_given = bool(threads) or optimization is not None
        if not self._settings_given and (
            tuned := load_tuned(self.folder, choose_provider(provider), self.contract.flavour)
        ):
            self.settings, self.tuning_file = tuned
        self.session, self.provider = create_session(
            graph_folder,
            self.contract,
            provider,
            self.settings.threads,
            cuda_graph,
            spinning,
            profile_placement=verify_placement,
            optimization=self.settings.optimization,
        )
        self.float_prefill = None  # an int8 cache's prompts run through the float-cache twin graph (CPU)
        if float_prefill and self.contract.prefill_model_file and self.provider == PROVIDERS["cpu"]:
            prefill_session, _ = create_session(
                graph_folder,
                self.contract,
                "cpu",
                self.settings.threads,
                spinning=spinning,
                optimization=self.settings.optimization,
                model_file=self.contract.prefill_model_file,
            )
            self.float_prefill = FloatPrefill.load(graph_folder, self.contract, prefill_session)
        self.tokenizer = Tokenizer(self.folder)
        self.eos_ids, self.pad_id = end_tokens(read_json(self.folder / "generation_config.json"))
        if self.contract.flavour == "fused":
            self.graph = FusedGraph(
                self.session, self.contract, self.pad_id, self.device, max_length, cuda_graph, self.float_prefill
            )
        else:
            self.graph = PortableGraph(self.session, self.contract, self.pad_id)
        self.fallback_nodes: list[str] = []
        if self.provider != PROVIDERS["cpu"] and verify_placement:  # one probe run, profiled
            self.graph.logits([self.pad_id, self.pad_id])
            self.fallback_nodes = check_placement(Path(self.session.end_profiling()), self.provider, allow_fallback)

    @property
    def device(self) -> str:
        """Where the session's tensors live: "cuda" or "cpu"."""
        return "cuda" if self.provider.startswith("CUDA") else "cpu"

    @property
    def flavour(self) -> str:
        return self.contract.flavour

    def describe_settings(self) -> str:
        """The session settings in use and where they come from, for a log line."""
        source = (
            f"tuned on this machine: {self.tuning_file.name}"
            if self.tuning_file
            else "as given"
            if self._settings_given
            else "defaults; `optimize tune` measures this machine"
        )
        reason = f"; {self.provider_reason}" if self.provider_reason else ""
        return f"{self.settings.describe()} ({source}){reason}"

    def describe_kv(self) -> str:
        """The cache's type for a log line, and how prompts fill it when that differs from decoding."""
        kv = self.contract.kv_dtype
        return f"{kv}, prompts through the float-cache graph" if self.float_prefill is not None else kv

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Logits [T, V] of one sequence (teacher forcing), from an empty cache."""
        return self.graph.logits(ids)

    def prefill(self, prompts: list[list[int]], room: int = 0):
        """Run the prompts; returns (last logits [B, V], state for `decode`). `room`: new tokens to come."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeFailure("every prompt needs at least one token")
        return self.graph.prefill(prompts, room)

    def decode(self, tokens: np.ndarray, state, greedy: bool = False) -> np.ndarray:
        """One token for each row still generating -> their logits [R, V], or with `greedy` their
        argmax tokens [R] (on CUDA picked on the device: no logits copied to the host)."""
        return self.graph.decode(np.asarray(tokens, dtype=np.int64), state, greedy)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 128,
        params: SamplingParams | list[SamplingParams] = SamplingParams(),
        on_token: Callable[[int, int], None] | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Generate for a batch of token-id prompts. `on_token(row, token_id)` streams each new token."""
        n = len(prompts)
        per_row = params if isinstance(params, list) else [params] * n
        rngs = [np.random.default_rng(p.seed) for p in per_row]
        greedy = all(p.greedy for p in per_row)  # then decode returns tokens, not logits
        out: list[list[int]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        result = GenerationResult(out, finish_reasons=reasons)
        if max_new_tokens <= 0:
            return result
        started = time.perf_counter()
        logits, state = self.prefill(prompts, max_new_tokens)
        choices = logits.argmax(-1) if greedy else logits  # per row: its token (greedy) or its logits
        result.prefill_seconds = time.perf_counter() - started
        active = np.arange(n)  # original row of each batch row still generating
        session_before = self.graph.session_seconds
        started = time.perf_counter()
        while True:
            next_tokens, keep = [], []
            for b, row in enumerate(active):
                token = int(choices[b]) if greedy else sample(choices[b], per_row[row], rngs[row])
                if token in self.eos_ids and not ignore_eos:
                    reasons[row] = "stop"
                    continue
                out[row].append(token)
                if on_token:
                    on_token(int(row), token)
                if len(out[row]) < max_new_tokens:
                    next_tokens.append(token)
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                rows = np.array(keep)
                self.graph.keep(state, rows)
                active = active[rows]
            choices = self.decode(np.array(next_tokens), state, greedy)
            result.decode_steps += 1
        result.decode_seconds = time.perf_counter() - started
        result.decode_session_seconds = self.graph.session_seconds - session_before
        return result


def runner_graph_folder(folder: Path, graph: str = "auto") -> Path:
    """The folder of the graph a Generator runs: `fused/` when asked for or, with "auto", when present."""
    if graph not in GRAPHS:
        raise RuntimeFailure(f"graph '{graph}' is not one of {', '.join(GRAPHS)}")
    fused = Path(folder) / "fused"
    if graph == "fused" and not (fused / CONTRACT_FILE).is_file():
        raise RuntimeFailure(f"{folder}: no fused graph (export with `fused: true`)")
    return fused if graph != "portable" and (fused / CONTRACT_FILE).is_file() else Path(folder)


def load_contract(folder: Path) -> Contract:
    try:
        return Contract.load(folder)
    except (FileNotFoundError, ValueError) as e:
        raise RuntimeFailure(str(e)) from e


def end_tokens(gen: dict) -> tuple[set[int], int]:
    """The ids generation stops on and the padding id, from a generation config (eos one id or a list;
    padding defaults to the smallest end id)."""
    eos = gen.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return eos_ids, gen.get("pad_token_id", min(eos_ids) if eos_ids else 0)


def read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}
