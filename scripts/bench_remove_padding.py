"""Padding removal (`learner.remove_padding`) against padded micro-batches, on one CPU learner rank.

    .venv/bin/python scripts/bench_remove_padding.py [--reps 5] [--rows 8] [--threads 2]

A random Qwen2 with Qwen2.5's vocabulary (151,936) and a small body (--hidden 256, --layers 4), and
one rank's share of an RL batch whose responses differ in length as sampled ones do (a 64-token
prompt, responses uniform in 16..--max-response tokens). Each variant runs the same `update`
(forward, backward, AdamW; GRPO; the chunked head), interleaved A/B/C per repetition; medians
after the first repetition:
  * padded: one micro-batch of every row, padded to the longest (rows sorted by length);
  * packed: the same micro-batch with remove_padding (one sequence, no padded position);
  * one row per micro-batch: no padding either, one forward per row.
Printed: seconds per update and the positions each forward runs (padded: rows x longest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.backends.network import free_port  # noqa: E402


def write_model(path: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=hidden * 16 // 3 // 64 * 64 or 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 7) if heads % 7 == 0
                      else max(1, heads // 2), max_position_embeddings=4096, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(path)


def rl_batch(rows: int, max_response: int):
    import random

    from services.learner.batch import TrainBatch

    rng = random.Random(0)
    prompt = [rng.randrange(1, 151936) for _ in range(64)]
    responses = [[rng.randrange(1, 151936) for _ in range(rng.randint(16, max_response))] for _ in range(rows)]
    return TrainBatch.from_sequences([prompt] * rows, responses, [rng.gauss(0, 1) for _ in range(rows)],
                                     [False] * rows, pad_id=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-response", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256, help="896: Qwen2.5-0.5B's width (MLP 4,736 here, 14 heads / 2 kv)")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    from services.config import GRPOConfig, LearnerConfig
    from services.learner.worker import LearnerWorker

    path = Path(tempfile.mkdtemp(prefix="aepo-bench-pad-"))
    write_model(path, args.hidden, args.layers)
    batch = rl_batch(args.rows, args.max_response)
    lengths = batch.attention_mask.sum(1)
    base = dict(num_workers=1, cpus_per_worker=args.threads, micro_batch_size=args.rows, mini_batches=1, lr=1e-7,
                share_prefix=False, chunked_head=True, entropy_chunk_size=1024, cpu_compute="float32")
    variants = {
        "padded": (LearnerConfig(**base), args.rows * int(lengths.max())),
        "packed (remove_padding)": (LearnerConfig(**base, remove_padding=True), int(lengths.sum())),
        "one row per micro-batch": (LearnerConfig(**{**base, "micro_batch_size": 1}), int(lengths.sum())),
    }
    worker = LearnerWorker(0, 1, str(path), variants["padded"][0], GRPOConfig(), seed=0)
    worker.setup("127.0.0.1", free_port())
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for _ in range(args.reps + 1):
            for name, (cfg, _) in variants.items():
                worker.cfg = cfg
                t = time.perf_counter()
                worker.update(batch)
                times[name].append(time.perf_counter() - t)
    finally:
        worker.shutdown()
    for name, (_, positions) in variants.items():
        print(json.dumps({"variant": name, "rows": args.rows, "tokens": int(lengths.sum()), "positions": positions,
                          "update_s": round(statistics.median(times[name][1:]), 3),
                          "runs_s": [round(t, 3) for t in times[name][1:]], "threads": args.threads, "hidden": args.hidden,
                          "layers": args.layers}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
