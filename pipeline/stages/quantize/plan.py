"""Which layers a quantize step turns into which scheme, and how the plan is written down.

Made from the module names and shapes alone, so a model skeleton on the meta device serves (rtn.py,
layerwise.py) as well as a loaded model (the sensitivity budget).
"""

from __future__ import annotations

import json
import re

from pipeline.configs import QuantizeConfig
from pipeline.errors import StageError
from pipeline.quant.plan import decoder_linears
from pipeline.quant.primitives import QuantScheme, count_schemes

LM_HEAD_BITS = {"float": None, "int8": 8, "int4": 4}


def ignored(name: str, cfg: QuantizeConfig) -> str | None:
    """Why `name` stays float by the recipe's ignore list, or None."""
    hit = next((p for p in cfg.ignore if re.search(p, name)), None)
    return None if hit is None else f"matches ignore pattern '{hit}'"


def make_plan(model, cfg: QuantizeConfig) -> tuple[dict[str, QuantScheme], dict[str, str]]:
    """Which linear layers get which scheme; every layer left float is named with the reason."""
    plan, skipped = {}, {}
    float_zero = cfg.zero_point == "float"  # 4-bit layers only: 8-bit integer zero points are already fine-grained
    for name in decoder_linears(model):
        why = ignored(name, cfg)
        if why is not None:
            skipped[name] = why
            continue
        bits = next((b for p, b in cfg.overrides.items() if re.search(p, name)), cfg.bits)
        plan[name] = QuantScheme(bits, cfg.group_size, cfg.symmetric, float_zero and bits == 4)
    head_bits = LM_HEAD_BITS[cfg.lm_head]
    if head_bits:
        # a head whose codes the embedding shares keeps integer zero points: GatherBlockQuantized takes no others
        plan["lm_head"] = QuantScheme(
            head_bits,
            cfg.head_groups,
            cfg.symmetric,
            float_zero and head_bits == 4 and not embedding_shares_head(model, cfg),
        )
    else:
        skipped["lm_head"] = "lm_head: float (recipe)"
    if not any(n != "lm_head" for n in plan):
        raise StageError("quantize: the ignore list leaves no decoder layer to quantize")
    return plan, skipped


def embedding_shares_head(model, cfg: QuantizeConfig) -> bool:
    """A tied embedding quantized like the head reuses the head's codes: one copy on disk."""
    return model.config.tie_word_embeddings and cfg.embedding != "float" and cfg.embedding == cfg.lm_head


def scheme_dict(s: QuantScheme) -> dict:
    """The plan entry of a scheme; `float_zero` only where set, so integer plans read as before."""
    return {
        "bits": s.bits,
        "group_size": s.group_size,
        "symmetric": s.symmetric,
        **({"float_zero": True} if s.float_zero else {}),
    }


def plan_summary(plan: dict[str, QuantScheme]) -> str:
    return ", ".join(f"{v} {k}" for k, v in count_schemes(plan.values()).items())


EMBEDDING = "model.embed_tokens"


def embedding_scheme(model, cfg: QuantizeConfig) -> QuantScheme | None:
    """The embedding's own scheme (None: float), after checking GatherBlockQuantized can hold its rows."""
    if cfg.embedding == "float":
        return None
    hidden = model.get_submodule(EMBEDDING).weight.shape[1]
    if hidden % cfg.head_groups:
        key = "head_group_size" if cfg.head_group_size else "group_size"
        raise StageError(
            f"quantize.embedding: hidden size {hidden} is not a multiple of {key} {cfg.head_groups}; "
            f"GatherBlockQuantized needs whole blocks: use a {key} dividing it, or embedding: float"
        )
    return QuantScheme(LM_HEAD_BITS[cfg.embedding], cfg.head_groups, cfg.symmetric)


def plan_file(
    method: str, shapes: dict[str, tuple[QuantScheme, int, int]], embed: dict | None, skipped: dict[str, str]
) -> str:
    """quant_plan.json: each quantized layer's scheme and [N, K] (in `shapes`' order), the embedding's entry
    (its own codes, or the head's it shares), and why each float layer stayed float."""
    layers = {n: {**scheme_dict(s), "N": rows, "K": cols} for n, (s, rows, cols) in shapes.items() if n != EMBEDDING}
    if embed is not None:
        s, rows, cols = shapes["lm_head" if embed["shared_with"] else EMBEDDING]
        layers[EMBEDDING] = {**scheme_dict(s), "N": rows, "K": cols, **embed}
    return json.dumps({"method": method, "layers": layers, "skipped": skipped}, indent=2) + "\n"
