"""Speed of the step's compute parts on this machine, each against the way it was done before.

    .venv/bin/python scripts/bench_components.py [--config deploy/configs/cpu_default.yaml] [--reps 12]

Uses the config's model (the warm-started tiny model: built first if it is not cached) and prints,
as medians over interleaved repetitions (this class of machine is noisy; interleaving keeps the
comparison fair):
  * generation of one AEPO step's rows (prompts x G at T=1 plus as many at T_reg) on one thread:
    SDPA + transformers' DynamicCache, then eager attention + the preallocated KV cache, then also
    each distinct prompt prefilled once (the default);
  * one learner update on one rank (one thread) of one rank's share of a GRPO batch, rows grouped
    by prompt as the driver sends them: plain forward (rows in order), plain with rows sorted by
    length, each prompt once (shared prefix), and each prompt once with the decoder layers in bf16
    (cpu_compute bfloat16, what `auto` picks on an AMX CPU);
  * one warm-start SFT step of one worker (one thread, half of the batch of 256): float32 + SDPA,
    float32 + eager attention, bf16 layers + eager attention;
  * the full-weight gather of a 2-rank FSDP2 group (gloo): torch's get_model_state_dict vs the
    flat bucketed all-gather;
  * the weight sync through Ray as the driver runs it (the config's learner group and one rollout
    actor): the learners' return of the state dict and the rollout actor's load, with the tensors
    pickled (before) and as numpy arrays (now, services/backends/wire.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.backends.network import free_port  # noqa: E402


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs[1:]):.3f} s"


def bench_generation(model_path: str, cfg, reps: int) -> list:
    import torch

    from services.data.countdown import make_splits
    from services.rollout.engines import EngineRequest
    from services.rollout.engines.hf import HFEngine
    from services.model.tiny import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(model_path)
    train, _ = make_splits(cfg.data.num_train, cfg.data.num_eval, cfg.data.seed)
    P, G = cfg.trainer.prompts_per_step, cfg.rollout.group_size
    reqs = [EngineRequest(tok(p.prompt)["input_ids"], n=G, temperature=t, max_tokens=cfg.rollout.max_tokens, seed=5)
            for t in (1.0, 1.2) for p in train[:P]]
    engines = {
        "before: sdpa + DynamicCache": HFEngine(
            model_path, seed=0, attn_implementation="sdpa", preallocate_kv=False, share_prefill=False),
        "eager + preallocated KV": HFEngine(model_path, seed=0, share_prefill=False),
        "now: + each prompt prefilled once": HFEngine(model_path, seed=0),
    }
    times: dict[str, list[float]] = {k: [] for k in engines}
    outs = None
    for _ in range(reps):
        for name, eng in engines.items():
            t = time.perf_counter()
            outs = eng.generate(reqs)
            times[name].append(time.perf_counter() - t)
    print(f"\ngeneration, {len(reqs) * G} rows ({P} prompts x {G} at T=1 and at T=1.2), 1 thread:")
    for name, ts in times.items():
        print(f"  {name:34s} {med(ts)}")
    return [(list(r.prompt_ids), o.response_ids) for r, group in zip(reqs[:P], outs[:P]) for o in group]


def bench_learner(model_path: str, cfg, rows: list, reps: int) -> None:
    import random

    import torch

    from services.config import AEPOConfig
    from services.learner.batch import TrainBatch, shard_batch
    from services.learner.fsdp import build_fsdp_model, make_adamw
    from services.learner.worker import LearnerWorker

    rng = random.Random(0)
    batch = TrainBatch.from_sequences([p for p, _ in rows], [r for _, r in rows], [rng.gauss(0, 1) for _ in rows],
                                      [False] * len(rows), pad_id=0)
    shard = shard_batch(batch, cfg.learner.num_workers, 1)[0]
    lcfg = cfg.learner.model_copy(update={"num_workers": 1, "cpus_per_worker": 1, "lr": 1e-7, "cpu_compute": "float32"})
    worker = LearnerWorker(0, 1, model_path, lcfg, AEPOConfig(mode="replace"), seed=0)
    worker.setup("127.0.0.1", free_port())
    f32 = (worker.model, worker.optimizer)
    bcfg = lcfg.model_copy(update={"cpu_compute": "bfloat16"})
    bmodel = build_fsdp_model(model_path, bcfg, torch.device("cpu"))
    bf16 = (bmodel, make_adamw(bmodel.parameters(), lr=bcfg.lr))
    modes = {
        "plain forward, rows in order": (f32, False, lcfg.model_copy(update={"sort_by_length": False})),
        "plain forward, sorted by length": (f32, False, lcfg.model_copy(update={"sort_by_length": True})),
        "each prompt once, float32": (f32, True, lcfg),
        "each prompt once, plain head": (f32, True, lcfg.model_copy(update={"chunked_head": False})),
        "each prompt once, bf16 layers": (bf16, True, bcfg),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(reps):
        for name, ((model, opt), share, c) in modes.items():
            worker.model, worker.optimizer, worker._share_prefix, worker.cfg = model, opt, share, c
            t = time.perf_counter()
            worker.update(shard)
            times[name].append(time.perf_counter() - t)
    worker.shutdown()
    print(f"\nlearner update, one rank's shard ({len(shard)} rows, micro-batches of {lcfg.micro_batch_size}), 1 thread:")
    for name, ts in times.items():
        print(f"  {name:32s} {med(ts)}")
    torch.set_num_threads(1)


def bench_sft(model_path: str, cfg, reps: int) -> None:
    import random

    import torch

    from services.data.countdown import make_splits
    from services.learner.fsdp import make_adamw
    from services.model.tiny import load_causal_lm, load_tokenizer
    from services.model.precision import autocast_layers, decoder_layers
    from services.model.warmstart import SFT_MICRO_BATCHES, sft_backward, sft_batch

    torch.set_num_threads(1)
    tok = load_tokenizer(model_path)
    train, _ = make_splits(cfg.data.num_train, cfg.data.num_eval, cfg.data.seed)
    per_worker = cfg.warm_start.batch_size // cfg.warm_start.num_workers
    rng = random.Random(0)
    batches = [sft_batch(train, tok, per_worker, rng, cfg.data.space_prob) for _ in range(reps)]
    variants = {}
    for name, attn, bf16 in (("float32 + SDPA", "sdpa", False), ("float32 + eager", "eager", False),
                             ("bf16 layers + eager", "eager", True)):
        model = load_causal_lm(model_path, attn_implementation=attn).train()
        if bf16:
            autocast_layers(decoder_layers(model))
        variants[name] = (model, make_adamw(model.parameters(), lr=1e-7))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for batch in batches:
        for name, (model, opt) in variants.items():
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            sft_backward(model, *batch, SFT_MICRO_BATCHES)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            times[name].append(time.perf_counter() - t)
    print(f"\nwarm-start SFT step, one worker's {per_worker} rows, 1 thread:")
    for name, ts in times.items():
        print(f"  {name:32s} {med(ts)}")


def _gather_worker(rank: int, world: int, model_path: str, port: int, reps: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from services.config import LearnerConfig
    from services.learner.fsdp import build_fsdp_model
    from services.learner.gather import gather_full_state

    model = build_fsdp_model(model_path, LearnerConfig(), torch.device("cpu"))
    ways = {
        "before: get_model_state_dict": lambda: get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
        "now: flat bucketed all-gather": lambda: gather_full_state(model, 64 << 20),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            dist.barrier()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def bench_gather(model_path: str, reps: int) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, model_path, port, reps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=600)
    for p in procs:
        p.join()
    print("\nfull-weight gather for the weight sync, 2 FSDP2 ranks (gloo):")
    for name, ts in times.items():
        print(f"  {name:32s} {statistics.median(ts[1:]) * 1000:.1f} ms")


def bench_ray_sync(model_path: str, cfg, reps: int) -> None:
    import ray

    from services.learner.group import LearnerGroup
    from services.rollout.pool import RolloutPool
    from services.backends.ray_cluster import init_ray, learner_config

    init_ray(num_cpus=4, quiet=True)
    group = LearnerGroup(model_path, learner_config(cfg), cfg.algorithm, seed=0)
    pool = RolloutPool(model_path, cfg.rollout, seed=0)

    def pickled_ref():  # what state_dict_ref did before: the tensors themselves
        refs = [w.full_state_dict.remote() for w in group.workers]
        ray.get(refs[1:])
        ray.wait(refs[:1])
        return refs[0]

    ways = {"before: tensors pickled": pickled_ref, "before: numpy arrays": group.state_dict_ref,
            "now: bucket refs": group.weight_buckets}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    version = 0
    try:
        for _ in range(reps):
            for name, ref_of in ways.items():
                version += 1
                t = time.perf_counter()
                ref = ref_of()
                t1 = time.perf_counter()
                pool.load_weights(version, ref)
                times[name].append((t1 - t, time.perf_counter() - t1))
    finally:
        group.shutdown()
        pool.shutdown()
    print("\nweight sync through Ray (2 learner ranks -> 1 rollout actor), medians:")
    for name, ts in times.items():
        g, l = (statistics.median(x[i] for x in ts[1:]) * 1000 for i in (0, 1))
        print(f"  {name:26s} learners' return {g:.1f} ms, rollout load {l:.1f} ms, total {g + l:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/configs/cpu_default.yaml")
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from services.cli.config_file import load_config
    from services.cli.train import prepare_model

    cfg = load_config(ROOT / args.config)
    model_path, _ = prepare_model(cfg, progress=True)
    print(f"model: {model_path}")
    rows = bench_generation(model_path, cfg, args.reps)
    bench_learner(model_path, cfg, rows, args.reps)
    bench_sft(model_path, cfg, args.reps)
    bench_gather(model_path, args.reps)
    bench_ray_sync(model_path, cfg, args.reps)


if __name__ == "__main__":
    main()
