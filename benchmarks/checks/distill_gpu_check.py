"""The distill stage's CUDA path, in one short run: `make distill-gpu-check` (or this script with a teacher).

    python -m benchmarks.checks.distill_gpu_check TEACHER [--out artifacts/gpu-check]

TEACHER is an hf-model artifact (the model step of a SmolLM2 run). Checks, each recorded pass/fail in
distill_gpu_check.json (exit status 1 when one fails):
  head_loss_fp32  the chunked KD + CE head (pipeline/distill/head_loss.py) against the full-logits losses
                  on the GPU in float32: loss and every gradient
  head_loss_bf16  the same under bf16 autocast (looser: the two paths round differently)
  scoring         the loss-when-skipped layer scores on the GPU against the CPU's, and the layers kept
  width           MLP channels and KV groups pruned on the GPU against the CPU: the same weights kept
  train           the loop for 2 steps on the GPU (bf16 autocast), with its peak device memory
Random token ids: the checks compare paths, they do not measure quality. Runs in about a minute on an
H200 after the teacher is read (nothing to install beyond the project's torch stack: no ONNX Runtime).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.configs import DistillConfig, DistillLossConfig
from pipeline.distill import head_loss
from pipeline.distill.losses import ce_loss, kd_loss
from pipeline.distill.prune import choose_layers, layer_importance, prune_depth, prune_kv_groups, prune_mlp
from pipeline.distill.train import train
from pipeline.models import load_torch_model


def head_loss_gap(student, teacher, ids, autocast: bool) -> dict:
    """Chunked against full-logits KD (T = 2) + 0.5 CE: relative loss gap and the gradients' agreement."""
    terms = head_loss.Terms(kd=1.0, ce=0.5, temperature=2.0)
    device = ids.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
        full = terms.kd * kd_loss(s_logits, t_logits, 2.0) + terms.ce * ce_loss(s_logits, ids)
    del t_logits, s_logits
    student.zero_grad()
    full.backward()
    expected = torch.cat([p.grad.flatten() for p in student.parameters()])
    student.zero_grad()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad(), head_loss.returning_hidden(teacher):
            t_final = teacher(input_ids=ids, use_cache=False).logits
        with head_loss.returning_loss(student, head_loss.next_token_targets(ids), terms, t_final, teacher.lm_head):
            chunked = student(input_ids=ids, use_cache=False).logits[0]
    chunked.backward()
    got = torch.cat([p.grad.flatten() for p in student.parameters()])
    student.zero_grad()
    return {
        "loss_full": float(full),
        "loss_chunked": float(chunked),
        "loss_rel_gap": abs(float(chunked) - float(full)) / abs(float(full)),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(got.double(), expected.double(), dim=0)),
        "grad_max_rel": float((got - expected).abs().max() / expected.abs().max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("--out", type=Path, default=Path("artifacts/gpu-check"))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script's code where there is no GPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("distill_gpu_check: no CUDA device (torch.cuda.is_available() is False)")
    gpu = torch.device(args.device)
    checks: dict[str, dict] = {}

    def record(name: str, ok: bool, **facts) -> None:
        checks[name] = {"ok": bool(ok), **facts}
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {json.dumps(facts, default=str)}", flush=True)

    cpu_teacher = load_torch_model(Path(args.teacher), attention="sdpa").requires_grad_(False)
    teacher = copy.deepcopy(cpu_teacher).to(gpu)
    vocab, layers = teacher.config.vocab_size, teacher.config.num_hidden_layers
    blocks = torch.randint(0, vocab, (16, 256), generator=torch.Generator().manual_seed(0))
    keep = choose_layers(layers, max(1, layers * 2 // 3), "uniform")

    student = prune_depth(teacher, keep).requires_grad_(True).train()
    ids = blocks[:4].to(gpu)
    fp32 = head_loss_gap(student, teacher, ids, autocast=False)
    record("head_loss_fp32", fp32["loss_rel_gap"] < 1e-4 and fp32["grad_cosine"] > 0.99999, **fp32)
    bf16 = head_loss_gap(student, teacher, ids, autocast=True)
    record("head_loss_bf16", bf16["loss_rel_gap"] < 1e-2 and bf16["grad_cosine"] > 0.999, **bf16)
    del student

    started = time.perf_counter()
    on_gpu = layer_importance(teacher, blocks[:4], "loss")
    gpu_seconds = time.perf_counter() - started
    started = time.perf_counter()
    on_cpu = layer_importance(cpu_teacher, blocks[:4], "loss")
    cpu_seconds = time.perf_counter() - started
    gap = max(abs(a - b) for a, b in zip(on_gpu, on_cpu))
    same = choose_layers(layers, len(keep), "loss", on_gpu) == choose_layers(layers, len(keep), "loss", on_cpu)
    record(
        "scoring",
        gap < 1e-3 and same,
        max_score_gap=gap,
        same_layers_kept=same,
        gpu_seconds=round(gpu_seconds, 2),
        cpu_seconds=round(cpu_seconds, 2),
    )

    narrow = {}
    for name, model in (("gpu", copy.deepcopy(teacher)), ("cpu", copy.deepcopy(cpu_teacher))):
        prune_mlp(model, teacher.config.intermediate_size * 3 // 4, blocks[:4])
        prune_kv_groups(model, max(1, teacher.config.num_key_value_heads - 1), blocks[:4])
        narrow[name] = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        del model
    shapes = all(narrow["gpu"][k].shape == narrow["cpu"][k].shape for k in narrow["cpu"])
    diff = (
        max(float((narrow["gpu"][k] - narrow["cpu"][k]).abs().max()) for k in narrow["cpu"]) if shapes else float("inf")
    )
    record("width", shapes and diff < 1e-5, same_shapes=shapes, max_weight_diff=diff)

    student = prune_depth(teacher, keep)
    cfg = DistillConfig(
        num_layers=len(keep),
        sequence_length=256,
        batch_size=4,
        grad_accum=1,
        tokens=2 * 4 * 256,
        eval_every=10**6,
        checkpoint_every=10**6,
        eval_samples=4,
        bf16="auto",
        loss=DistillLossConfig(kd=1.0, ce=0.5, temperature=2.0),
    )
    if gpu.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    log: list[str] = []
    with tempfile.TemporaryDirectory() as ckpt:
        student, history = train(student, teacher, blocks[:8], blocks[8:12], {}, cfg, Path(ckpt), log.append)
    on_device = next(student.parameters()).device.type == gpu.type
    record(
        "train",
        on_device and all(map(torch.isfinite, map(torch.tensor, history.loss))),
        device=str(next(student.parameters()).device),
        loss=history.loss,
        heldout_perplexity=history.eval_ppl[-1],
        tokens_per_second=round(history.tokens_seen / history.train_seconds, 1),
        peak_device_mib=history.peak_device_mib,
        log=log[:2],
    )

    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if gpu.type == "cuda" else "cpu (dry run)"
    report = {"gpu": name, "torch": torch.__version__, "checks": checks}
    (args.out / "distill_gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'distill_gpu_check.json'}")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
