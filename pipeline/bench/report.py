"""The bench's outputs: a Markdown table on stdout, bench.json and bench.png."""

from __future__ import annotations

import json
import os
from pathlib import Path


def table(results: list[dict], work) -> str:
    lengths, batches = work.prompt_lengths, work.batches
    head = (
        ["engine", "precision", "load s"] + [f"TTFT {n} ms" for n in lengths] + [f"decode b{b} tok/s" for b in batches]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("status", "ok") != "ok":
            lines.append(
                f"| {r['engine']} | {r['status']}: {r['reason']} (`{r.get('install') or ''}`) |"
                + " |" * (len(head) - 2)
            )
            continue
        cells = [label(r), precision(r), f"{r['load_s']:.2f}"]
        cells += [_num(r["ttft_ms"].get(n)) for n in lengths]
        cells += [_num(r["decode_tok_s"].get(b)) for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def label(r: dict) -> str:
    """ours (fused), ours (fused, CUDA graph), or a peer's engine name."""
    extras = [r["graph"]] if "graph" in r else []
    if r.get("cuda_graph"):
        extras.append("CUDA graph")
    return r["engine"] + (f" ({', '.join(extras)})" if extras else "")


def precision(r: dict) -> str:
    """The engine's precision, with the INT4 layout a peer was built in where it says (int4 asym g32 acc4)."""
    text = r.get("precision", r.get("weights", ""))
    # onnxruntime-genai before 0.13 named its builder options int4_*
    options = {k.removeprefix("int4_"): v for k, v in (r.get("builder_options") or {}).items()}
    if "is_symmetric" in options:
        text += " " + ("sym" if options["is_symmetric"] == "true" else "asym") + f" g{options['block_size']}"
        if "accuracy_level" in options:
            text += f" acc{options['accuracy_level']}"
    return text


def _num(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def write(out_dir: Path, payload: dict) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    tmp = path.with_name(f".bench.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path, _chart(out_dir / "bench.png", payload)


def _chart(path: Path, payload: dict) -> Path | None:
    """The decode and TTFT curves; None where matplotlib is not installed (the runtime-only install)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in payload["results"] if r.get("status", "ok") == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        name = label(r)
        batches = sorted(int(b) for b in r["decode_tok_s"])
        left.plot(batches, [r["decode_tok_s"][b] for b in batches], marker="o", label=name)
        lengths = sorted(int(n) for n in r["ttft_ms"])
        right.plot(lengths, [r["ttft_ms"][n] for n in lengths], marker="o", label=name)
    left.set(xlabel="batch size", ylabel="decode tokens/s (all sequences)", title="Decode throughput")
    right.set(xlabel="prompt tokens", ylabel="ms", title="Time to first token (batch 1)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    machine = payload["machine"]
    fig.suptitle(f"{payload['artifact_name']} on {machine['cpu']} ({machine['cores']} cores)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
