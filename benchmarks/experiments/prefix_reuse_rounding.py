"""How far a reused prefix's logits are from a whole prefill's, and whether a greedy reply changes.

    .venv/bin/python -m benchmarks.experiments.prefix_reuse_rounding artifacts/smollm2-int4-rtn ["What is the capital of France?"]

The server's slots run a prompt whose first tokens another request left in the cache as a
continuation: only the rest runs, the last token at least, as one row. This script prefills a chat
prompt whole, and again with all but its last token taken from the cache, through the artifact's
fused graph as exported and with every MatMulNBits switched to float compute (`accuracy_level` 0,
in memory). It prints the largest logit difference and the greedy replies (24 tokens) both ways, and
writes benchmarks/results/serve-load/prefix_reuse_rounding.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from runtime import Generator, find_model_folder
from runtime.serve.slots import SlotCache

OUT = Path(__file__).resolve().parents[1] / "results" / "serve-load" / "prefix_reuse_rounding.json"
NEW_TOKENS = 24


def reply(slots: SlotCache, row: int, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    """The prompt's next-token logits and its greedy reply, decoded in `row` alone."""
    first = slots.prefill(row, prompt).copy()
    tokens = [int(np.argmax(first))]
    for _ in range(NEW_TOKENS - 1):
        tokens.append(int(np.argmax(slots.decode(np.array([tokens[-1]]))[0])))
    return first, tokens


def main() -> None:
    folder = find_model_folder(sys.argv[1])
    question = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?"
    gen = Generator(folder, provider="cpu", graph="fused")
    model = onnx.load(str(folder / "fused" / gen.contract.model_file))
    levels = sorted(
        {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    )
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        for attr in (a for a in node.attribute if a.name == "accuracy_level"):
            attr.i = 0
    sessions = {
        f"as exported (accuracy_level {levels})": gen.session,
        "float compute (accuracy_level 0)": ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        ),
    }
    prompt = gen.tokenizer.encode_chat(question)
    rows = []
    for name, session in sessions.items():
        whole = SlotCache(session, gen.contract, 1, len(prompt) + NEW_TOKENS + 1, reuse_prefixes=False)
        reused = SlotCache(session, gen.contract, 1, len(prompt) + NEW_TOKENS + 1)
        reused.prefill(0, prompt[:-1] + [prompt[-1] + 1])  # the same prompt but its last token, then freed
        reused.free(0)
        a, whole_tokens = reply(whole, 0, prompt)
        b, reused_tokens = reply(reused, 0, prompt)
        row = {
            "graph": name,
            "prompt_tokens": len(prompt),
            "cached_tokens": reused.last_cached,
            "max_abs_logit_diff": float(np.abs(a - b).max()),
            "reply_whole": gen.tokenizer.decode(whole_tokens),
            "reply_reused": gen.tokenizer.decode(reused_tokens),
            "same_reply": whole_tokens == reused_tokens,
        }
        rows.append(row)
        print(
            f"{name}: {row['cached_tokens']} of {len(prompt)} prompt tokens cached, largest logit difference "
            f"{row['max_abs_logit_diff']:.3g}; reply whole {row['reply_whole']!r}, with the prefix reused "
            f"{row['reply_reused']!r}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"artifact": str(folder), "question": question, "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
