"""Throughput of the rollout engines and the FSDP learners on the embedded tiny model.

    .venv/bin/python scripts/bench_rollout_learner.py --engine hf        # hf engine + learners (1 vs 2 workers)
    .venv/bin/python scripts/bench_rollout_learner.py --engine vllm-cpu  # vllm-cpu engine + learners
    ... --engine hf --prompts 32 --group 8 --reg-prompts 8 --max-tokens 24 --repeats 3

One "step" is what the RL loop generates: prompts x group samples at T=1 plus reg-prompts x group
at T=1.2, in one call (default 32x8 + 8x8 = 320 samples of <= 24 tokens). Reported: engine
tokens/s (median over repeats, after one warm-up), weight-sync seconds (engine side, state dict
already in the process), learner tokens/s for the update (old-log-prob pass + forward/backward +
AdamW) with 1 and with 2 FSDP workers sharing this machine's cores, and the full-state-dict gather.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time


def parse_args() -> argparse.Namespace:
    try:
        import vllm  # noqa: F401

        default_engine = "vllm-cpu"
    except ImportError:
        default_engine = "hf"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default=default_engine, choices=["hf", "vllm", "vllm-cpu"])
    p.add_argument("--prompts", type=int, default=32, help="GRPO prompts per step (default 32)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--reg-prompts", type=int, default=8, help="regularizer prompts per step at T=1.2 (default 8)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    p.add_argument("--workers", default="1,2", help="learner worker counts to time (default 1,2)")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--skip-learner", action="store_true")
    return p.parse_args()


def countdown_prompts(tokenizer, n: int) -> list[tuple[int, list[int]]]:
    from services.data.countdown import sample_problem
    from services.model.tiny import encode_prompt

    rng = random.Random(0)
    return [(i, encode_prompt(tokenizer, sample_problem(rng).prompt)) for i in range(n)]


def bench_engine(args, path: str, prompts) -> tuple[dict, list]:
    """Median generation throughput and weight-sync time of one in-process RolloutService."""

    from services.config import RolloutConfig
    from services.model.tiny import load_causal_lm
    from services.rollout.service import RolloutService, SamplingRequest

    t0 = time.perf_counter()
    svc = RolloutService(path, RolloutConfig(engine=args.engine, max_tokens=args.max_tokens), seed=0)
    start_s = time.perf_counter() - t0
    reqs = [SamplingRequest(prompts, args.group, 1.0), SamplingRequest(prompts[: args.reg_prompts], args.group, 1.2)]
    svc.generate_many(reqs, seed=0)  # warm-up
    runs = [svc.generate_many(reqs, seed=i + 1) for i in range(args.repeats)]
    weights = load_causal_lm(path).state_dict()
    syncs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        svc.load_weights(1, {k: v.clone() for k, v in weights.items()})
        syncs.append(time.perf_counter() - t0)
    samples = [s for group in runs[-1].samples for s in group]
    svc.close()
    return {
        "engine": args.engine,
        "engine_start_s": round(start_s, 2),
        "samples_per_step": len(samples),
        "gen_s_per_step": round(statistics.median(r.stats["gen_s"] for r in runs), 3),
        "gen_tokens_per_s": round(statistics.median(r.stats["gen_tokens_per_s"] for r in runs), 1),
        "mean_response_tokens": round(statistics.mean(len(s.response_ids) for s in samples), 1),
        "weight_sync_s": round(statistics.median(syncs), 4),
    }, samples


def bench_learners(args, path: str, samples) -> list[dict]:
    """Update throughput with 1 and 2 FSDP workers on a batch shaped like one RL step."""
    import ray
    import torch

    from services.config import GRPOConfig, LearnerConfig
    from services.learner.batch import TrainBatch
    from services.learner.group import LearnerGroup
    from services.backends.ray_cluster import init_ray

    cpus = os.cpu_count() or 2
    init_ray(num_cpus=cpus)  # local, loopback only
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch.from_sequences(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples],
        torch.randn(len(samples), generator=g), [False] * len(samples), pad_id=0,
    )
    out = []
    for n in [int(x) for x in args.workers.split(",")]:
        # the machine's cores split evenly: 1 worker gets every thread, 2 workers half each
        cfg = LearnerConfig(num_workers=n, cpus_per_worker=cpus / n, micro_batch_size=args.micro_batch)
        group = LearnerGroup(path, cfg, GRPOConfig(), seed=0)
        group.update(batch)  # warm-up
        stats = [group.update(batch) for _ in range(args.repeats)]
        gathers = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ray.get(group.state_dict_ref())
            gathers.append(time.perf_counter() - t0)
        group.shutdown()
        out.append({
            "learner_workers": n,
            "sequences": len(batch),
            "update_s": round(statistics.median(s["update_s"] for s in stats), 3),
            "learner_tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in stats), 1),
            "full_state_dict_gather_s": round(statistics.median(gathers), 4),
        })
    ray.shutdown()
    return out


def main() -> None:
    args = parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    from services.config import ModelConfig
    from services.model.tiny import load_tokenizer, resolve_model_path

    path = resolve_model_path(ModelConfig())
    prompts = countdown_prompts(load_tokenizer(path), args.prompts)
    engine_row, samples = bench_engine(args, path, prompts)
    print(json.dumps(engine_row), flush=True)
    if args.skip_learner:
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        print(json.dumps({"learner": "skipped: ray is not installed in this environment"}))
        return
    for row in bench_learners(args, path, samples):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard is required
    main()
