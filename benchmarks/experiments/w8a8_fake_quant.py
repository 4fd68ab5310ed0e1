"""Where static W8A8 loses, in PyTorch fake-quant (no export): the diagnosis behind `hadamard`.

    .venv/bin/python -m benchmarks.experiments.w8a8_fake_quant [--windows 20]

On the reference model, SmoothQuant `auto` and the static input scales as the quantize stage computes
them (WikiText-2 valid, 32 x 256 tokens), every decoder linear's weights int8 per channel and its
input rounded static or per token; perplexity on the first --windows 512-token windows of WikiText-2
test (each window scored in full, so the figures are not the validate stage's). Prints a table and
writes benchmarks/results/quantize/w8a8_fake_quant.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from calibration import load_text, sample_blocks
from pipeline.models import load_torch_model
from pipeline.quant.plan import decoder_linears
from pipeline.quant.rotation import rotate
from pipeline.stages.quantize.w8a8 import (
    ROTATED,
    fake_quant_activations,
    fake_quant_static,
    fake_quant_weight,
    smoothquant,
    static_input_scales,
)
from runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "quantize" / "w8a8_fake_quant.json"
GROUPS = {
    "q/k/v": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate/up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def fake_quantized(model, scales: dict, mode_of, rotated: bool = False):
    """A copy of `model` with each decoder linear's weight int8 and its input rounded as mode_of(name) says."""
    model = copy.deepcopy(model)
    for name in decoder_linears(model):
        m = model.get_submodule(name)
        rot = rotated and name.endswith(ROTATED)
        m.weight.data = fake_quant_weight(rotate(m.weight.data) if rot else m.weight.data)
        mode = mode_of(name)

        def hook(_m, args, name=name, mode=mode, rot=rot):
            x = rotate(args[0]) if rot else args[0]
            return (
                fake_quant_static(x, scales[name]["scale"])
                if mode == "static"
                else fake_quant_activations(x, "dynamic_per_token"),
            )

        m.register_forward_pre_hook(hook)
    return model


def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(5):
            logits = model(input_ids=batch).logits[:, :-1]
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += batch[:, 1:].numel()
    return float(np.exp(nll / count))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="float checkpoint (default: the fp32 recipe's model step)")
    ap.add_argument("--windows", type=int, default=20)
    args = ap.parse_args()
    src = args.model or next((ROOT / "artifacts" / "smollm2-fp32").glob("00-model-*"))
    tok = Tokenizer(src)
    base = load_torch_model(src).eval()
    test = torch.tensor(tok.encode(load_text("wikitext-2", "test"), add_special_tokens=False))
    windows = test[: args.windows * 512].reshape(args.windows, 512)
    valid = np.array(tok.encode(load_text("wikitext-2", "valid"), add_special_tokens=False), dtype=np.int64)
    blocks = torch.from_numpy(sample_blocks(valid, 256, 32, 0))
    batches = list(blocks.split(8))
    quiet = lambda _line: None  # noqa: E731
    rows: list[tuple[str, float]] = [("float", perplexity(base, windows))]
    for hadamard in (False, True):
        started = time.time()
        smoothed = copy.deepcopy(base)
        smoothquant(smoothed, batches, "auto", "static", log=quiet, hadamard=hadamard)
        scales = static_input_scales(smoothed, batches, decoder_linears(smoothed), log=quiet, hadamard=hadamard)
        tag = " + hadamard" if hadamard else ""
        print(f"calibrated{tag} in {time.time() - started:.0f} s", flush=True)
        rows.append(
            (
                f"static everywhere{tag}",
                perplexity(fake_quantized(smoothed, scales, lambda n: "static", hadamard), windows),
            )
        )
        rows.append(
            (
                f"per token everywhere{tag}",
                perplexity(fake_quantized(smoothed, scales, lambda n: "token", hadamard), windows),
            )
        )
        if not hadamard:
            for group, names in GROUPS.items():
                mode_of = lambda n, names=names: "static" if n.rsplit(".", 1)[-1] in names else "token"  # noqa: E731
                rows.append(
                    (
                        f"static {group} only, per token elsewhere",
                        perplexity(fake_quantized(smoothed, scales, mode_of), windows),
                    )
                )
    print(
        f"\n| fake-quant variant (SmoothQuant auto, searched for static) | perplexity, {args.windows} windows | Δ % |\n|---|---|---|"
    )
    for label, value in rows:
        print(f"| {label} | {value:.4f} | {100 * (value / rows[0][1] - 1):+.2f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"windows": args.windows, "rows": dict(rows)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
