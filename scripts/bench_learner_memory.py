"""Peak memory of one learner update on a Qwen2.5-0.5B-shaped model on CPU: the plain head (the
model's [b, L, V] logits) against the chunked head (`learner.chunked_head`), with and without
activation checkpointing and a token budget, beside what `aepo plan` estimates for the same setting.

    .venv/bin/python scripts/bench_learner_memory.py                  # every case, one JSON line each
    .venv/bin/python scripts/bench_learner_memory.py --cases 2k-plain,2k-chunked --chunk 512
    .venv/bin/python scripts/bench_learner_memory.py --small --model-dir /tmp/small   # the script itself, in seconds

The model: transformers' Qwen2Config at Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 kv
heads, MLP 4864, vocabulary 151,936, tied embeddings), random weights, float32, written once to
--model-dir. Each case runs in a fresh subprocess (so peaks do not mix): one learner rank
(`LearnerWorker`, FSDP2 with world size 1, gloo, `hold_full_params: false` as on a GPU), GRPO,
one `update` (forward, backward, AdamW step) on rows x seq_len tokens of random ids (a prompt of
seq_len / 8, the rest response), with AdamW's moments already allocated (as in every update
after a run's first; --first-update: without). The update's peak is the process's VmHWM, reset (clear_refs 5)
just before the update; the process runs under an address-space limit (--limit-gib), so a case
that does not fit fails with an allocation error instead of waking the kernel's OOM killer.
The estimate is `services.model.plan_memory.learner_memory` for the same shape, learner settings
and layout on device "cpu" (compute bytes 4: float32), i.e. its `always` + `update` terms.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2**30

# name: rows, seq_len, chunked_head, gradient_checkpointing, max_tokens_per_micro_batch (None: one micro-batch)
CASES = {
    "2k-plain": (1, 2048, False, False, None),
    "2k-plain-ckpt": (1, 2048, False, True, None),
    "2k-chunked": (1, 2048, True, False, None),
    "2k-chunked-ckpt": (1, 2048, True, True, None),
    "4k-plain": (2, 2048, False, False, None),
    "4k-plain-ckpt": (2, 2048, False, True, None),
    "4k-plain-budget2k": (2, 2048, False, False, 2048),
    "4k-chunked": (2, 2048, True, False, None),
    "4k-chunked-ckpt": (2, 2048, True, True, None),
    "4k-chunked-budget2k": (2, 2048, True, False, 2048),
}


QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)
SMALL = dict(QWEN25_05B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=5000)


def write_model(path: Path, small: bool = False) -> None:
    """The random model (Qwen2.5-0.5B's shape, or --small's to check the script) as a checkpoint directory, once."""
    if (path / "config.json").exists():
        return
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**(SMALL if small else QWEN25_05B))).float().save_pretrained(path, safe_serialization=True)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def learner_config(case: str, chunk: int, threads: int):
    from services.config import LearnerConfig

    rows, seq_len, chunked, ckpt, budget = CASES[case]
    return LearnerConfig(num_workers=1, cpus_per_worker=float(threads), micro_batch_size=rows, mini_batches=1,
                         chunked_head=chunked, gradient_checkpointing=ckpt, max_tokens_per_micro_batch=budget,
                         entropy_chunk_size=chunk, hold_full_params=False, cpu_compute="float32", lr=1e-6)


def plan_estimate(case: str, lc, model_dir: str) -> dict:
    """`aepo plan`'s learner estimate for this setting (the model's config.json, device cpu)."""
    import math

    from services.model.plan_memory import LearnerLayout, learner_memory, shape_from_hf_config

    rows, seq_len, _, _, budget = CASES[case]
    micro = rows if budget is None else max(1, min(rows, budget // seq_len))
    layout = LearnerLayout(rows, micro, math.ceil(rows / micro), seq_len, fused=True)
    shape = shape_from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()), model_dir)
    est = learner_memory(shape, lc, False, "cpu", 1, layout)
    return {"plan_peak_gib": round((est.phase("always") + est.phase("update")) / GiB, 2),
            "plan_terms_gib": {t[0]: round(t[2] / GiB, 2) for t in est.terms if t[3] in ("always", "update")}}


def synthetic_batch(rows: int, seq_len: int, vocab: int):
    import torch

    from services.learner.batch import TrainBatch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (rows, seq_len), generator=g).tolist()
    cut = seq_len // 8
    return TrainBatch.from_sequences([r[:cut] for r in tokens], [r[cut:] for r in tokens],
                                     [1.0 if i % 2 == 0 else -1.0 for i in range(rows)], [False] * rows, pad_id=0)


def create_adam_state(worker) -> None:
    """AdamW's moments, as every update after a run's first has them: one step on zero gradients at lr 0."""
    import torch

    opt = worker.optimizer
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in worker.model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr


def run_case(case: str, model_dir: str, chunk: int, limit_gib: float, threads: int, adam_state: bool) -> dict:
    """One case in this (fresh) process: setup, reset the peak, one update, the peak."""
    limit = int(limit_gib * GiB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from services.backends.network import free_port
    from services.config import GRPOConfig
    from services.learner.worker import LearnerWorker

    rows, seq_len, chunked, ckpt, budget = CASES[case]
    lc = learner_config(case, chunk, threads)
    out = {"case": case, "rows": rows, "seq_len": seq_len, "tokens": rows * seq_len, "chunked_head": chunked,
           "gradient_checkpointing": ckpt, "max_tokens_per_micro_batch": budget, "entropy_chunk_size": chunk,
           "threads": int(lc.cpus_per_worker), **plan_estimate(case, lc, model_dir)}
    worker = LearnerWorker(0, 1, model_dir, lc, GRPOConfig(), seed=0)
    worker.setup("127.0.0.1", free_port())
    batch = synthetic_batch(rows, seq_len, worker.vocab_size)
    if adam_state:
        create_adam_state(worker)
    out["adam_state_before"] = adam_state
    out["setup_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2)
    out["rss_before_update_gib"] = round(_rss("VmRSS") / GiB, 2)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is the update's
    t0 = time.perf_counter()
    try:
        stats = worker.update(batch)
    except (RuntimeError, MemoryError) as exc:
        out.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", limit_gib=limit_gib)
        return out
    finally:
        out["update_s"] = round(time.perf_counter() - t0, 1)
        out["update_peak_gib"] = round(_rss("VmHWM") / GiB, 2)
    out.update(grad_norm=round(float(stats["grad_norm"]), 6), pg_loss=round(float(stats["pg_loss"]), 8),
               entropy=round(float(stats["entropy"]), 6), process_peak_gib=round(
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2))
    worker.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--chunk", type=int, default=512, help="learner.entropy_chunk_size (positions per head chunk)")
    ap.add_argument("--model-dir", default="/tmp/aepo-bench-mem/qwen2.5-0.5b-shape")
    ap.add_argument("--limit-gib", type=float, default=20.0, help="address-space limit of each case's process")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per case")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (learner.cpus_per_worker)")
    ap.add_argument("--first-update", action="store_true",
                    help="no AdamW state before the update (a run's first); default: the moments exist, as in every later one")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same layout (checks the script in seconds)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the subprocess's own case
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.model_dir, args.chunk, args.limit_gib, args.threads,
                                  not args.first_update)), flush=True)
        return
    write_model(Path(args.model_dir), args.small)
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--case", case, "--chunk", str(args.chunk), "--model-dir", args.model_dir,
               "--limit-gib", str(args.limit_gib), "--threads", str(args.threads)] + (["--first-update"] if args.first_update else [])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=ROOT)
        except subprocess.TimeoutExpired:
            print(json.dumps({"case": case, "error": f"timed out after {args.timeout_s:g} s"}), flush=True)
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode == 0 and lines:
            print(lines[-1], flush=True)
        else:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            print(json.dumps({"case": case, "error": f"exit {done.returncode}", "tail": tail}), flush=True)


if __name__ == "__main__":
    main()
