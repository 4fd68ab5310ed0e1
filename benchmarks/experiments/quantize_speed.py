"""Where the GPTQ recipe's quantize time goes, and what each speed-up of its passes saves, in one run.

    .venv/bin/python -m benchmarks.experiments.quantize_speed [--batches 4] [--layers 0 10 20 29]

On the reference model (the fp32 recipe's model step), calibration blocks of 8 x 512 tokens of
WikiText-2 valid:
1. One decoder layer's GPTQ passes, per batch (median of `--repeats` turns): collecting the Hessians of its linears' inputs as the
   stage did (eager attention, the whole layer run, full XᵀX products), then with each change added in
   turn (sdpa attention; the forward stopped once the last linear has its input; only the blocks of
   XᵀX on and above the diagonal), and the pass that runs the quantized layer for the next one.
2. The budget's sensitivity pass on every linear of `--layers` plus the head: the whole model's forward
   per candidate with log-softmax KL (as it was) against `sensitivities` (each forward from the
   candidate's own layer), with the largest relative difference of the KLs they give.
Prints a table and writes benchmarks/results/quantize/quantize_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from calibration import load_text, sample_blocks
from calibration.collect import capture_layer_inputs, decoder_layers, feed_inputs, input_hooks, run_layer
from pipeline.models import load_torch_model
from pipeline.quant.awq import fake_quant
from pipeline.quant.gptq import add_gram
from pipeline.quant.primitives import QuantScheme
from pipeline.stages.quantize.budget import sensitivities
from runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "quantize" / "quantize_speed.json"
LAYER = 3  # the layer whose GPTQ passes are timed (every layer has the same shapes)


def full_gram(H: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    H += (x.T @ x) * alpha


def hessian_pass(layer, hidden, kwargs, stop_early: bool, gram) -> float:
    """Seconds per batch to collect every linear's XᵀX (inputs shared by q/k/v and gate/up counted once)."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    acc: dict[str, torch.Tensor] = {}
    seen: dict[tuple, torch.Tensor] = {}

    def sink(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        key = (x.data_ptr(), tuple(x.shape))
        if key not in seen:
            seen[key] = x
            gram(acc.setdefault(name, torch.zeros(x.shape[1], x.shape[1])), x, 1.0)

    started = time.perf_counter()
    for h, kw in zip(hidden, kwargs):
        if stop_early:
            feed_inputs(layer, h, kw, linears, sink)
        else:
            with input_hooks(linears, sink):
                run_layer(layer, [h], [kw])
        seen.clear()
    return (time.perf_counter() - started) / len(hidden)


def gptq_passes(src: Path, batches: list[torch.Tensor], repeats: int) -> list[dict]:
    """Each variant `repeats` times, the variants taking turns; the median per batch (this machine is noisy)."""
    rows, outputs = [], {}
    for attention in ("eager", "sdpa"):
        model = load_torch_model(src, attention=attention)
        hidden, kwargs = capture_layer_inputs(model, batches)
        layer = decoder_layers(model)[LAYER]
        run_layer(layer, hidden[:1], kwargs[:1])  # warm-up
        variants = [("whole layer, full XᵀX", False, full_gram)]
        if attention == "sdpa":
            variants += [
                ("stopped after the last input, full XᵀX", True, full_gram),
                ("stopped after the last input, upper blocks of XᵀX", True, add_gram),
            ]
        times: dict[str, list[float]] = {what: [] for what, _, _ in variants} | {"run_layer": []}
        for _ in range(repeats):
            for what, stop, gram in variants:
                times[what].append(hessian_pass(layer, hidden, kwargs, stop, gram))
            started = time.perf_counter()
            outputs[attention] = run_layer(layer, hidden, kwargs)
            times["run_layer"].append((time.perf_counter() - started) / len(hidden))
        for what, seconds in times.items():
            rows.append(
                {
                    "pass": "quantized layer's outputs" if what == "run_layer" else "Hessians",
                    "attention": attention,
                    "how": what,
                    "ms_per_batch": round(1000 * statistics.median(seconds), 1),
                    "ms_per_batch_all": [round(1000 * t, 1) for t in seconds],
                }
            )
    eager, sdpa = torch.cat(outputs["eager"]), torch.cat(outputs["sdpa"])
    rows[-1]["max_abs_diff_vs_eager"] = float((sdpa - eager).abs().max())
    rows[-1]["max_abs_output"] = float(eager.abs().max())
    return rows


def whole_forward_sensitivities(model, plan: dict[str, QuantScheme], ids: torch.Tensor) -> dict[str, float]:
    """The pass as it was: the whole model per candidate, KL through log-softmax."""
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.double(), -1)
        out = {}
        for name in plan:
            module = model.get_submodule(name)
            original = module.weight.data
            module.weight.data = fake_quant(original, plan[name])
            lp = F.log_softmax(model(ids).logits.double(), -1)
            module.weight.data = original
            out[name] = max(0.0, float((ref.exp() * (ref - lp)).sum(-1).mean()))
    return out


def sensitivity_pass(src: Path, ids: torch.Tensor, layers: list[int]) -> list[dict]:
    rows, found = [], {}
    for attention, how, fn in (
        ("eager", "whole forward per candidate", whole_forward_sensitivities),
        ("sdpa", "whole forward per candidate", whole_forward_sensitivities),
        ("sdpa", "from the candidate's own layer", sensitivities),
    ):
        model = load_torch_model(src, attention=attention)
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and (n == "lm_head" or any(n.startswith(f"model.layers.{i}.") for i in layers))
        ]
        plan = {n: QuantScheme(4, 32, False) for n in names}
        started = time.perf_counter()
        found[(attention, how)] = fn(model, plan, ids)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "pass": "sensitivity",
                "attention": attention,
                "how": how,
                "candidates": len(names),
                "s_per_candidate": round(seconds / len(names), 3),
            }
        )
    first, last = found[("eager", "whole forward per candidate")], found[("sdpa", "from the candidate's own layer")]
    rows[-1]["max_rel_diff_vs_first"] = max(abs(last[n] - first[n]) / first[n] for n in first)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="float checkpoint (default: the fp32 recipe's model step)")
    ap.add_argument("--batches", type=int, default=4, help="calibration batches of 8 x 512 tokens for the GPTQ passes")
    ap.add_argument("--repeats", type=int, default=3, help="turns of each GPTQ-pass variant (the median is reported)")
    ap.add_argument(
        "--layers", type=int, nargs="+", default=[0, 10, 20, 29], help="decoder layers for the sensitivity pass"
    )
    args = ap.parse_args()
    src = args.model or next((ROOT / "artifacts" / "smollm2-fp32").glob("00-model-*"))
    valid = np.array(Tokenizer(src).encode(load_text("wikitext-2", "valid"), add_special_tokens=False), dtype=np.int64)
    blocks = torch.from_numpy(sample_blocks(valid, 512, 8 * args.batches, 0))
    batches = list(blocks.split(8))
    sens_ids = torch.from_numpy(sample_blocks(valid, 128, 4, 0))  # the shipped recipe's sensitivity_samples / _length
    rows = gptq_passes(src, batches, args.repeats) + sensitivity_pass(src, sens_ids, args.layers)
    print(f"| pass | attention | how | cost | torch {torch.__version__}, {torch.get_num_threads()} threads |")
    print("|---|---|---|---|---|")
    for r in rows:
        cost = (
            f"{r['ms_per_batch']} ms per 8 x 512 batch"
            if "ms_per_batch" in r
            else f"{r['s_per_candidate']} s per candidate ({r['candidates']})"
        )
        extra = (
            f"max relative KL difference {r['max_rel_diff_vs_first']:.1e}"
            if "max_rel_diff_vs_first" in r
            else f"max abs difference from eager {r['max_abs_diff_vs_eager']:.1e} (outputs up to {r['max_abs_output']:.0f})"
            if "max_abs_diff_vs_eager" in r
            else ""
        )
        print(f"| {r['pass']} | {r['attention']} | {r['how']} | {cost} | {extra} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "layer": LAYER,
                "batches": args.batches,
                "sensitivity_layers": args.layers,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    tmp.replace(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
