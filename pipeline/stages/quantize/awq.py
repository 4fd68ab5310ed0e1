"""AWQ over one decoder layer (the math is in pipeline.quant.awq; layerwise.py walks the layers).

For the layer: collect the inputs of each group of linears that share an input, search the
activation-aware scale and fold it into the op that feeds them (exact in float), search each
group's clipping range, quantize, refit the group scales on the output error (`refit_scales`, see
pipeline.quant.refit); the caller then runs the quantized layer to feed the next one. With `awq.codes: gptq`
the codes of the scaled weights come from GPTQ instead of the clip search (the AWQ paper's
combination of the two): each distinct linear input also accumulates its Hessian over every
calibration token, and a fold of s turns it into H / (s sᵀ), the Hessian of the inputs x / s. With
`awq.objective: block` (the default) the scale of q/k/v is judged by the attention block's output
and that of gate/up by the MLP's output (as AutoAWQ does); the others, and every scale with
`awq.objective: linear`, by the linears' own outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from calibration.collect import feed_inputs, run_layer
from pipeline.archs import arch_for
from pipeline.configs import QuantizeConfig
from pipeline.errors import StageError
from pipeline.quant.awq import search_clip, search_scale, search_scale_on_output
from pipeline.quant.gptq import HessianAccumulator, gptq_refit
from pipeline.quant.primitives import QTensor, QuantScheme, quantize
from pipeline.quant.refit import padded_gram, refit_scales

# (op whose output feeds the linears, the linears) within one decoder layer of the Llama family, Phi-3's
# packed linears and Gemma 2/3's MLP norm; a layer has the groups whose modules it has (`scale_groups`)
SCALE_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("input_layernorm", ("self_attn.qkv_proj",)),
    ("self_attn.v_proj", ("self_attn.o_proj",)),  # only without grouped-query attention (shapes must match)
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
# the block whose output judges a group's scale, where a nonlinearity sits between the linears and the next fold
JUDGED_BY = {"input_layernorm": "self_attn", "post_attention_layernorm": "mlp", "pre_feedforward_layernorm": "mlp"}


def scale_groups(layer: torch.nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The layer's groups of linears that read one input, each with the op that produces it. With a
    pre_feedforward_layernorm (Gemma 2 and 3) that norm feeds the MLP, and post_attention_layernorm acts on the
    attention's output."""
    names = {name for name, _ in layer.named_modules()}
    if "pre_feedforward_layernorm" in names:
        names.discard("post_attention_layernorm")
    return tuple((f, group) for f, group in SCALE_GROUPS if f in names and all(n in names for n in group))


def feeds(layer: torch.nn.Module, feeder: str) -> bool:
    """Whether `feeder`'s output is what its group's linears read, so that scales fold into it. A norm is only in a
    pre-norm layer (Llama's); OLMo 2's blocks read the residual stream and its norms act on their outputs."""
    return not feeder.endswith("layernorm") or hasattr(layer, "input_layernorm")


def norm_offset(layer: torch.nn.Module) -> float:
    """What the layer's norms add to their weight before multiplying (Gemma's 1 + weight; archs.ArchSpec)."""
    return arch_for(layer.self_attn.config).norm_offset


class InputStats:
    """Mean and max |x| per channel over every calibration token, plus a seeded sample of tokens for the searches."""

    def __init__(
        self,
        keep: int,
        generator: torch.Generator,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        hessian: bool = False,
    ):
        self.sum, self.max, self.count, self.sample, self.keep, self.gen = None, None, 0, [], keep, generator
        self.transform = transform  # statistics of transform(x) instead of x (a rotated input)
        self.hessian: HessianAccumulator | None = None  # over every token, not the sample (GPTQ codes)
        self._want_hessian = hessian

    def add(self, x: torch.Tensor, batches: int) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.transform is not None:
            x = self.transform(x)
        if not torch.isfinite(x).all():
            raise FloatingPointError
        self.sum = x.abs().sum(0) if self.sum is None else self.sum + x.abs().sum(0)
        self.max = x.abs().amax(0) if self.max is None else torch.maximum(self.max, x.abs().amax(0))
        self.count += x.shape[0]
        if self._want_hessian:
            self.hessian = self.hessian or HessianAccumulator(x.shape[-1])
            self.hessian.add(x)
        take = min(x.shape[0], -(-self.keep // batches))
        self.sample.append(x[torch.randperm(x.shape[0], generator=self.gen)[:take]])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.sample)[: self.keep], self.sum / self.count


def awq_layer(
    layer: torch.nn.Module,
    prefix: str,
    index: int,
    plan: dict[str, QuantScheme],
    cfg: QuantizeConfig,
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    gen: torch.Generator,
) -> dict[str, QTensor]:
    """Fold the searched scales into the layer and return the codes of its planned linears (full names)."""
    use_gptq = cfg.awq.codes == "gptq"
    collected = collect_inputs(
        layer,
        hidden,
        kwargs,
        cfg.search_tokens,
        gen,
        index,
        hessians=[names[0] for _, names in scale_groups(layer)] if use_gptq else (),
    )
    stats = {n: s.result() for n, s in collected.items()}
    hessians = shared_hessians(layer, collected) if use_gptq else {}
    judges = block_judges(layer, hidden[0], kwargs[0], stats) if cfg.awq.objective == "block" else {}
    for feeder, names in scale_groups(layer):
        if feeds(layer, feeder):
            _scale_group(layer, feeder, names, prefix, plan, stats, judges.get(feeder), hessians.get(names[0]))
    qtensors: dict[str, QTensor] = {}
    for name, module in layer.named_modules():
        if prefix + name in plan:
            x, _ = stats[name]
            qtensors[prefix + name] = _quantize_codes(
                x, module.weight.data, plan[prefix + name], cfg, hessians.get(name)
            )
    return qtensors


def awq_head(
    norm: torch.nn.Module,
    weight: torch.Tensor,
    scheme: QuantScheme,
    cfg: QuantizeConfig,
    hidden: list[torch.Tensor],
    gen: torch.Generator,
) -> QTensor:
    """The LM head's codes (no scale to fold: it may be tied to the embedding), from the final norm's outputs."""
    stats = InputStats(cfg.search_tokens, gen, hessian=cfg.awq.codes == "gptq")
    with torch.no_grad():
        for h in hidden:
            stats.add(norm(h), len(hidden))
    x, _ = stats.result()
    return _quantize_codes(x, weight, scheme, cfg, stats.hessian.H if stats.hessian is not None else None)


def _quantize_codes(
    x: torch.Tensor, w: torch.Tensor, scheme: QuantScheme, cfg: QuantizeConfig, H: torch.Tensor | None = None
) -> QTensor:
    """Codes for the scaled weight: (`awq.codes: gptq`) GPTQ under the Hessian H of every calibration token, or
    clip search and rounding on the sampled inputs x; then (`refit_scales`) each row's group scales refitted by
    least squares on its output error (under H for GPTQ's codes, else the sample's Gram matrix)."""
    if H is not None:
        return gptq_refit(w, H, scheme, cfg)
    qt = quantize(w, scheme, search_clip(x, w, scheme))
    if not cfg.refit_scales:
        return qt
    return refit_scales(qt, w, padded_gram(x, scheme.group_size), descent=cfg.code_descent)


def shared_hessians(layer: torch.nn.Module, collected: dict[str, InputStats]) -> dict[str, torch.Tensor]:
    """linear -> the Hessian of its input, one tensor shared by the linears of a scale group (they read the same
    input), so that a fold updates it once for all of them."""
    out = {}
    for _, names in scale_groups(layer):
        acc = collected[names[0]].hessian
        if acc is not None:
            out.update({n: acc.H for n in names})
    return out


def collect_inputs(
    layer,
    hidden,
    kwargs,
    keep: int,
    gen,
    index: int,
    transforms: dict[str, Callable] | None = None,
    hessians: Collection[str] = (),
) -> dict[str, InputStats]:
    """Run the layer over the calibration batches; statistics of each linear's inputs (of transforms[name](x) where
    given), with the inputs' Hessian for the linears named in `hessians`."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = {name: InputStats(keep, gen, (transforms or {}).get(name), name in hessians) for name in linears}

    def sink(name: str, x: torch.Tensor) -> None:
        try:
            stats[name].add(x, len(hidden))
        except FloatingPointError:
            raise StageError(
                f"quantize: NaN/Inf in the inputs of model.layers.{index}.{name}; the model or data is broken"
            ) from None

    for h, kw in zip(hidden, kwargs):
        feed_inputs(layer, h, kw, linears, sink)
    return stats


def lines_up(feed: torch.nn.Module, mods: list[torch.nn.Linear]) -> bool:
    """Whether the feeder's outputs are the linears' inputs channel for channel (not so for v_proj -> o_proj
    under grouped-query attention, where a v channel feeds several o_proj inputs)."""
    return not isinstance(feed, torch.nn.Linear) or feed.out_features == mods[0].in_features


def fold_scale(feed: torch.nn.Module, mods: list[torch.nn.Linear], s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide the feeder's output channels by s and multiply the linears' input channels by s (exact in float).
    A norm multiplies each output channel by offset + weight."""
    if isinstance(feed, torch.nn.Linear):
        feed.weight.data /= s[:, None]
        if feed.bias is not None:
            feed.bias.data /= s
    else:
        feed.weight.data = (feed.weight.data + offset) / s - offset
    for m in mods:
        m.weight.data *= s[None, :]


def replay(layer, name: str, hidden: torch.Tensor, kwargs: dict) -> Callable[[], torch.Tensor]:
    """A call that re-runs the layer's submodule `name` on the arguments it gets when the layer runs on one batch."""
    module, seen = layer.get_submodule(name), {}

    def grab(_module, args, kw):
        seen["args"], seen["kwargs"] = args, kw

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_layer(layer, [hidden], [kwargs])
    finally:
        handle.remove()

    def forward() -> torch.Tensor:
        out = module(*seen["args"], **seen["kwargs"])
        return out[0] if isinstance(out, tuple) else out

    return forward


def block_judges(layer, hidden: torch.Tensor, kwargs: dict, stats: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """feeder -> the output that judges its group's scale: the attention block re-run on one calibration batch,
    the MLP on the sampled inputs of gate_proj (taken before any fold, as the searches need)."""
    mlp_input = stats[next(names[0] for f, names in scale_groups(layer) if JUDGED_BY.get(f) == "mlp")][0]
    blocks = {"self_attn": replay(layer, "self_attn", hidden, kwargs), "mlp": lambda: layer.mlp(mlp_input)}
    return {feeder: blocks[block] for feeder, block in JUDGED_BY.items()}


def _scale_group(
    layer,
    feeder: str,
    names: tuple[str, ...],
    prefix: str,
    plan: dict,
    stats: dict,
    judge: Callable[[], torch.Tensor] | None = None,
    hessian: torch.Tensor | None = None,
) -> None:
    """Search s for the group (by judge()'s output error where given, else by the linears' own), fold 1/s into
    the feeder and s into the linears; the inputs seen become x / s, and their Hessian (updated in place) H / (s sᵀ)."""
    mods = [layer.get_submodule(n) for n in names]
    feed = layer.get_submodule(feeder)
    if not lines_up(feed, mods):
        return
    planned = [(m, plan[prefix + n]) for n, m in zip(names, mods) if prefix + n in plan]
    if not planned:
        return
    x, x_mean = stats[names[0]]
    if judge is not None:
        s, _alpha = search_scale_on_output(x_mean, [m for m, _ in planned], [sc for _, sc in planned], judge)
    else:
        s, _alpha = search_scale(x, x_mean, [m.weight.data for m, _ in planned], [sc for _, sc in planned])
    fold_scale(feed, mods, s, norm_offset(layer))
    for n in names:
        sample, mean = stats[n]
        stats[n] = (sample / s, mean / s)
    if hessian is not None:
        hessian /= s[:, None] * s[None, :]
