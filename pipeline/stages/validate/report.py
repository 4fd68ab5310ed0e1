"""report.json (for machines) and report.md (for people) of the validate stage."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.configs import VALIDATE_METRICS


def write_reports(folder: Path, report: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(report))


def _gates_from(source: str) -> str:
    if source == "the recipe":  # a report written before the recipe's thresholds merged over the defaults
        return "the recipe's thresholds"
    return source if source.startswith(("the recipe", "none")) else f"by default, for {source}"


def render_markdown(report: dict) -> str:
    m, limits, p = report["metrics"], report["thresholds"], report["protocol"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [
        f"# Validation report: {verdict}",
        "",
        f"- artifact: `{report['artifact']}`",
        f"- baseline (accuracy): `{report['baseline']}` (PyTorch, float32)",
        f"- export source (parity): `{report['export_source']}`",
        f"- execution provider: {report['provider']}",
        f"- perplexity protocol: {p['dataset']} / {p['split']}, {p['windows']} windows of {p['context_length']} tokens, "
        f"stride {p['stride']}, {p['scored_tokens']} scored tokens, BOS {p['bos']}, text sha256 {p['text_sha256'][:12]}",
        f"- gates: {_gates_from(report.get('thresholds_from', 'the recipe'))}",
        "",
        "| metric | value | limit | result |",
        "| --- | --- | --- | --- |",
    ]
    for name, value in m.items():
        if "@" not in name:  # per-domain figures: their own table below
            lines.append(_metric_row(name, value, limits))
    if "domains" in p:
        lines += [
            "",
            "## Per evaluation text",
            "",
            "| text | source | windows | perplexity baseline | perplexity | Δ % | top-1 agreement | KL | gates |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for domain, proto in p["domains"].items():
            keys = [f"{k}@{domain}" for k in ("perplexity_delta_pct", "top1_agreement", "kl_divergence", "perplexity")]
            gated = [_gate_verdict(k, m.get(k), limits) for k in keys]
            verdict = "**FAIL**" if "fail" in gated else "ok" if "ok" in gated else ""
            lines.append(
                f"| {domain} | {proto['dataset']} / {proto['split']} | {proto['windows']} | "
                f"{_fmt(proto['perplexity_baseline'])} | {_fmt(proto['perplexity'])} | {_fmt(m.get(keys[0]))} | "
                f"{_fmt(m.get(keys[1]))} | {_fmt(m.get(keys[2]))} | {verdict} |"
            )
    q = report.get("quantization")
    if q:
        lines += [
            "",
            "## Quantization",
            "",
            f"- method: {q['method']} (`{q['artifact']}`)",
            "- layers: " + ", ".join(f"{n} {k}" for k, n in q["layers"].items()),
            f"- kept float: {', '.join(q['float_layers']) or 'none'}",
        ]
        if q["int8_by_budget"]:
            lines.append(f"- raised to INT8 by the budget ({q['budget_estimate']}): {len(q['int8_by_budget'])} layers")
        if q["sensitivity_chart"]:
            lines += ["", f"![per-layer sensitivity]({q['sensitivity_chart']})"]
    if report["failures"]:
        lines += ["", "## Failed gates", ""] + [f"- {f}" for f in report["failures"]]
    lines += ["", "## Greedy samples (baseline vs. ONNX runner)", ""]
    for s in report["samples"]:
        mark = "identical" if s["identical"] else "DIFFERENT"
        lines += [f"**{s['prompt']}** ({mark})", "", f"- baseline: {s['baseline']!r}", f"- onnx: {s['onnx']!r}", ""]
    if report.get("chat"):
        lines += _chat_section(report["chat"])
    return "\n".join(lines) + "\n"


def _limit(name: str, limits: dict) -> float | None:
    """The limit on `name`: its own, or for `metric@domain` the plain metric's (which holds on every text)."""
    return limits.get(name, limits.get(name.partition("@")[0]) if "@" in name else None)


def _gate_verdict(name: str, value, limits: dict) -> str:
    limit = _limit(name, limits)
    if limit is None:
        return ""
    side = VALIDATE_METRICS[name.partition("@")[0]]
    return "ok" if value is not None and (value <= limit if side == "max" else value >= limit) else "fail"


def _metric_row(name: str, value, limits: dict) -> str:
    verdict = _gate_verdict(name, value, limits)
    if not verdict:
        return f"| {name} | {_fmt(value)} | | |"
    side = VALIDATE_METRICS[name.partition("@")[0]]
    return f"| {name} | {_fmt(value)} | {side} {_limit(name, limits):g} | {'ok' if verdict == 'ok' else '**FAIL**'} |"


def _chat_section(chat: dict) -> list[str]:
    """Counts, then every reply whose verdict differs between the two models, then the open instructions."""
    replies = chat["replies"]
    facts = [r for r in replies if r["answers"]]
    lines = [
        "## Chat replies (greedy, chat template)",
        "",
        f"- chat set: {chat['prompts']}, {len(replies)} prompts, {len(facts)} with answers, "
        f"at most {chat['max_new_tokens']} new tokens",
        f"- facts named: baseline {sum(bool(r['baseline_correct']) for r in facts)}, "
        f"onnx {sum(bool(r['onnx_correct']) for r in facts)} of {len(facts)}",
        f"- turns ended: baseline {sum(r['baseline_ended'] for r in replies)}, "
        f"onnx {sum(r['onnx_ended'] for r in replies)} of {len(replies)}",
        "",
    ]
    changed = [r for r in facts if bool(r["baseline_correct"]) != bool(r["onnx_correct"])]
    if changed:
        lines += ["Facts one model names and the other does not:", ""]
        for r in changed:
            lines += [
                f"**{r['prompt']}** (accepted: {', '.join(r['answers'])})",
                "",
                f"- baseline ({_verdict(r['baseline_correct'])}): {r['baseline']!r}",
                f"- onnx ({_verdict(r['onnx_correct'])}): {r['onnx']!r}",
                "",
            ]
    opened = [r for r in replies if not r["answers"]]
    if opened:
        lines += ["Open instructions:", ""]
        for r in opened:
            lines += [f"**{r['prompt']}**", "", f"- baseline: {r['baseline']!r}", f"- onnx: {r['onnx']!r}", ""]
    return lines


def _verdict(correct: bool | None) -> str:
    return "names it" if correct else "does not"


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
