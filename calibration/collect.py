"""Layer-by-layer calibration: run the decoder one layer at a time over the calibration batches.

Only one layer's inputs and outputs are held at once (plus the layer's own activations), so
memory is bounded by [samples, seq, hidden] rather than by the whole model's activations:

    embed ─► hidden ─► layer 0 ─► hidden' ─► layer 1 ─► …     (hidden replaced as we go)
                       ▲ hooks see each linear's inputs; the caller quantizes, then the
                         layer is re-run so the next layer sees the quantized layer's outputs
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class _Stop(Exception):
    pass


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def capture_layer_inputs(model, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering the first decoder layer, and the keyword arguments it was called with."""
    hidden, kwargs = [], []
    first = decoder_layers(model)[0]

    def grab(_module, args, kw):
        hidden.append((args[0] if args else kw.pop("hidden_states")).detach())
        kwargs.append({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")})
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def run_layer(layer, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for h, kw in zip(hidden, kwargs):
            out = layer(h, **kw)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def calibration_estimate(first, count: int, hidden: list[torch.Tensor], kwargs: list[dict], passes: float = 2.6) -> str:
    """Time one batch through the first of `count` layers and extrapolate: each layer runs about `passes` times
    per batch."""
    started = time.perf_counter()
    run_layer(first, hidden[:1], kwargs[:1])
    per_batch = time.perf_counter() - started
    minutes = per_batch * len(hidden) * passes * count / 60
    tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
    memory_mb = 2 * sum(h.numel() * h.element_size() for h in hidden) / 1e6
    return (
        f"calibration: {len(hidden)} batches, {tokens} tokens; estimate ~{minutes:.1f} min, "
        f"activations ~{memory_mb:.0f} MB (one layer at a time)"
    )


@contextmanager
def input_hooks(modules: dict[str, torch.nn.Module], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call sink(name, input) before each forward of each module."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: sink(name, args[0].detach()))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def feed_inputs(
    layer,
    hidden: torch.Tensor,
    kwargs: dict,
    modules: dict[str, torch.nn.Module],
    sink: Callable[[str, torch.Tensor], None],
) -> None:
    """sink(name, input) for each of `modules` (each run once per forward) on one batch, running the layer only
    until the last of them has its input: the layer's output is not needed, so in a decoder layer the down
    projection (a quarter of its multiplications) is skipped."""
    seen: set[str] = set()

    def see(name: str, x: torch.Tensor) -> None:
        sink(name, x)
        seen.add(name)
        if len(seen) == len(modules):
            raise _Stop

    with input_hooks(modules, see), torch.no_grad():
        try:
            layer(hidden, **kwargs)
        except _Stop:
            return
    raise RuntimeError(f"feed_inputs: the layer's forward never called {', '.join(sorted(set(modules) - seen))}")
