"""The default gates of a validate step: they follow the steps before it, so a template holds for any model.
A recipe's `thresholds` merge over them key by key (null drops one); `default_gates: false` leaves only the
recipe's."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.artifacts import Artifact

# a plain export computes what the model computes
FLOAT_PARITY = {
    "perplexity_delta_pct": 0.1,
    "greedy_token_agreement": 1.0,
    "batch_greedy_agreement": 1.0,
    "top1_agreement": 0.99,
    "decode_logits_max_abs_diff": 1e-2,
}
# the perplexity change a quantization may cost: about three times what the shipped recipes measure on the
# reference model (RTN INT4 with an INT4 head +32 %, GPTQ +3 %, W8A8 +0.4 %), for models that quantize less well
QUANTIZED_PERPLEXITY_PCT = {"int4-rtn": 40.0, "int4": 15.0, "int8": 1.0, "w8a8": 2.0}
# against the teacher: the 20-layer reference student measures -1.7 % to +12.7 % on text like its training text,
# and a student loses more on other text; this catches a broken student, not a weak one
DISTILLED_PERPLEXITY_PCT = 150.0
# weight-only codes with int8 compute against the dequantized model: catches a broken KV cache, not rounding
QUANTIZED_DECODE_DIFF = 3.0


def default_gates(history: Sequence[Artifact]) -> tuple[dict[str, float], str]:
    """The gates for what came before validate, and a phrase saying why (for the report)."""
    steps = {a.manifest.get("stage"): a.manifest for a in history}
    quantize, distill = steps.get("quantize"), steps.get("distill")
    if quantize is None and distill is None:
        return dict(FLOAT_PARITY), "float parity: no quantize or distill step before"
    gates: dict[str, float] = {}
    why = []
    if quantize is not None:
        cfg = quantize["config"]
        method, bits = cfg["method"], cfg.get("bits", 4)
        if method == "w8a8":
            kind = "w8a8"
        elif bits == 8:
            kind = "int8"
        else:
            kind = "int4-rtn" if method == "rtn" else "int4"
        gates["perplexity_delta_pct"] = QUANTIZED_PERPLEXITY_PCT[kind]
        if method != "w8a8":  # int8 activations stray from the float source by more than a cache bug would
            gates["decode_logits_max_abs_diff"] = QUANTIZED_DECODE_DIFF
        why.append(f"{method} {bits}-bit quantization")
    if distill is not None:
        gates["perplexity_delta_pct"] = DISTILLED_PERPLEXITY_PCT
        if quantize is None:
            gates["decode_logits_max_abs_diff"] = FLOAT_PARITY["decode_logits_max_abs_diff"]
        why.append("a distilled student against its teacher")
    return gates, " and ".join(why)


def gates_for(
    thresholds: dict[str, float | None], use_defaults: bool, history: Sequence[Artifact]
) -> tuple[dict[str, float], str]:
    """The recipe's `thresholds` merged key by key over the default gates (None drops a gate), and where they
    came from (for the report)."""
    defaults, why = default_gates(history) if use_defaults else ({}, "")
    merged = {k: v for k, v in {**defaults, **thresholds}.items() if v is not None}
    if why and thresholds:
        why += "; the recipe's thresholds over them"
    elif not why:
        why = "the recipe's thresholds" if merged else "none: every metric reported, none gates"
    return merged, why
