"""Weight sync, learner -> rollout, on CPU: bytes moved and seconds per sync, one JSON line per case.

    .venv/bin/python scripts/bench_weight_sync.py                       # every case (about 10 min, ~20 GB RAM)
    .venv/bin/python scripts/bench_weight_sync.py --cases 0.5b-real     # the real actors at 0.5B only
    .venv/bin/python scripts/bench_weight_sync.py --cases 7b-pair --object-store-gb 8
    .venv/bin/python scripts/bench_weight_sync.py --cases 0.5b-real --transports   # object store vs collective

One learner rank and one rollout actor in a local Ray on 127.0.0.1, random weights:

* `tiny-real`: the default job's tiny model (1 M parameters) and 2 learner ranks, as its steps sync.
* `0.5b-real`: a Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 kv heads,
  intermediate 4864, vocab 151936, tied embeddings; 494 M parameters), the real `LearnerGroup`
  (1 FSDP rank) and `RolloutPool` (1 hf actor, float32 as on CPU). Paths: `current` = the float32
  full dict as one object (`state_dict_ref`, what the trainer synced with before), `buckets` = the
  bucketed export (`weight_buckets`) in float32 (the CPU default) and in bfloat16. With
  `--transports`: the bucketed sync through the object store (A) against the collective transport
  (B, `learner.sync_transport: collective`: rank 0 broadcasts each bucket to the engine over gloo),
  same learners and engine, A/B/B/A blocks, medians.
* `0.5b-pair`, `7b-pair`: the transport alone, with a minimal actor pair that mimics the real
  methods (so say the figures): `ShapedLearner.export_weights` makes each parameter's float32
  tensor lazily (random, timed apart and left out), casts and packs it into buckets with the real
  `pack_bucket` and yields them (a streaming generator, as `LearnerWorker.export_weights`); the
  driver takes the refs with the real `bucket_refs`; `ShapedEngine.load_weights` fetches them with
  the real `iter_bucket_tensors` and copies every tensor into a bf16 scratch buffer (a GPU
  engine's dtype; a 7B model does not fit in this machine's RAM beside its buckets). At 7B
  (Qwen2.5-7B: hidden 3584, 28 layers, 28 heads, 4 kv heads, intermediate 18944, vocab 152064,
  untied; 7.6 B parameters) the model is synced in slices of at most --slice-gb of bf16 buckets,
  each end to end, so the buckets in the object store never exceed a slice; the slices' seconds add
  up to one sync. The current path's float32 dict (30.5 GB) cannot exist here: its bytes are
  computed, not measured.

The float32 full dict as it was before the bucketed sync (the gather before its copies were cut):
run this script with `--cases 0.5b-real --paths current` from a checkout of the commit before it.

Reported per case: `bytes` (tensor bytes each engine receives), `store_bytes` (the objects' size in
the object store), `export_s` (learner side until the driver holds the refs), `load_s` (the pool's
sync: every actor fetched and loaded), `total_s` (the trainer's weight_sync_total), medians over
--repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

QWEN_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tied=True)
QWEN_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, tied=False)


def qwen2_shapes(hidden, layers, heads, kv_heads, intermediate, vocab, tied) -> list[tuple[str, tuple]]:
    """The parameters of a Qwen2 model, HF names, in named_parameters order (a tied head once)."""
    kv = kv_heads * (hidden // heads)
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
                (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)),
                (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    out.append(("model.norm.weight", (hidden,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def start_ray(object_store_gb: float) -> None:
    """A local Ray as `init_ray` starts one (loopback only), with an object store sized for the case."""
    import ray

    from services.backends.network import LOOPBACK, local_ray_environment

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with local_ray_environment():
        ray.init(address="local", num_cpus=os.cpu_count() or 2, _node_ip_address=LOOPBACK, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, object_store_memory=int(object_store_gb * 2**30))


def store_bytes(refs) -> int:
    """The objects' sizes as the object store records them."""
    import ray

    locations = ray.experimental.get_object_locations(list(refs))
    return sum(int(v.get("object_size") or 0) for v in locations.values())


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- the real actors, 0.5B


def build_model_dir(shape: dict, root: Path) -> str:
    """A random Qwen2 model of `shape` (float32 safetensors) with the tiny character tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from services.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      intermediate_size=shape["intermediate"], max_position_embeddings=4096,
                      tie_word_embeddings=shape["tied"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = root / "model"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def time_sync(group, pool, way: str, version: int) -> dict:
    """One sync the way the trainer does it: export (the driver gets a handle), then the pool's load.
    The collective handle carries nothing: its export_s is ~0 and the broadcast is inside load_s."""
    t0 = time.perf_counter()
    handle = group.state_dict_ref() if way == "current" else group.weight_buckets()
    t1 = time.perf_counter()
    stats = pool.load_weights(version, handle)
    t2 = time.perf_counter()
    refs = [handle] if way == "current" else getattr(handle, "buckets", [])
    stored = store_bytes(refs) if refs else 0
    return {"export_s": t1 - t0, "load_s": stats["sync_s"], "engine_s": stats["engine_sync_s"], "total_s": t2 - t0,
            "bytes": int(stats.get("sync_bytes", stored)), "store_bytes": stored, "objects": len(refs)}


def summarize(case: dict, runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("export_s", "load_s", "engine_s", "total_s")}
    last = runs[-1]
    row = {**case, **{k: round(v, 3) for k, v in med.items()}, "bytes": last["bytes"],
           "store_bytes": last["store_bytes"], "objects": last["objects"],
           "total_s_runs": [round(r["total_s"], 3) for r in runs]}
    row["gb_per_s"] = round(row["bytes"] / 1e9 / max(row["total_s"], 1e-9), 2)
    return row


def bench_transports(args, case: str, group, pool, dtype: str, version: int) -> int:
    """The bucketed sync through the object store (A) and through the collective (B) on the same
    learners and engine, interleaved A/B/B/A per block so that drift (page cache, the other work on
    the machine) falls on both alike; one warm-up of each, then medians over --repeats blocks."""
    runs: dict[str, list] = {"object_store": [], "collective": []}
    order = ["object_store", "collective"] + ["object_store", "collective", "collective", "object_store"] * args.repeats
    base = group.cfg
    for i, transport in enumerate(order):
        group.cfg = base.model_copy(update={"sync_transport": transport})  # read on the driver only
        version += 1
        run = time_sync(group, pool, "buckets", version)
        if i >= 2:  # the first of each is a warm-up
            runs[transport].append(run)
    group.cfg = base
    for transport, rs in runs.items():
        emit(summarize({"case": case, "path": "buckets", "transport": transport, "dtype": dtype, "order": "A/B/B/A",
                        "actors": f"LearnerGroup({group.world_size} rank) -> RolloutPool(1 hf actor, float32)",
                        "bucket_mb": args.bucket_mb}, rs))
    return version


def bench_real(args, case: str, path: str, workers: int, cpus: float) -> None:
    """The real actors: `workers` learner ranks and one hf rollout actor (float32, as on CPU)."""
    from services.config import GRPOConfig, LearnerConfig, RecoveryConfig, RolloutConfig
    from services.learner.group import LearnerGroup
    from services.rollout.pool import RolloutPool

    recovery = RecoveryConfig(sync_timeout_s=1800, start_timeout_s=1800)
    pool = RolloutPool(path, RolloutConfig(engine="hf", num_actors=1, cpus_per_actor=cpus), seed=0, recovery=recovery)
    if args.transports:  # object store against collective, A/B/B/A, per sync dtype
        for dtype in args.dtypes.split(","):
            cfg = LearnerConfig(num_workers=workers, cpus_per_worker=cpus / workers, device="cpu",
                                sync_bucket_mb=args.bucket_mb, sync_dtype=dtype)
            group = LearnerGroup(path, cfg, GRPOConfig(), seed=0, recovery=recovery)
            bench_transports(args, case, group, pool, dtype, 0)
            group.shutdown()
        pool.shutdown()
        return
    version = 0
    plan = [("float32", [w for w in ("current", "buckets") if w in args.paths]),
            ("bfloat16", ["buckets"] if "buckets" in args.paths else [])]
    for dtype, ways in plan:
        if not ways:
            continue
        # sync_dtype only where buckets are timed: `--paths current` also runs on the code before them
        extra = {"sync_dtype": dtype} if "buckets" in ways else {}
        cfg = LearnerConfig(num_workers=workers, cpus_per_worker=cpus / workers, device="cpu",
                            sync_bucket_mb=args.bucket_mb, **extra)
        group = LearnerGroup(path, cfg, GRPOConfig(), seed=0, recovery=recovery)
        for way in ways:
            runs = []
            for i in range(args.repeats + 1):
                version += 1
                run = time_sync(group, pool, way, version)
                if i:  # the first is a warm-up
                    runs.append(run)
            emit(summarize({"case": case, "path": way, "dtype": "float32" if way == "current" else dtype,
                            "actors": f"LearnerGroup({workers} rank{'s' if workers > 1 else ''}) -> RolloutPool(1 hf "
                                      "actor, float32)", "bucket_mb": None if way == "current" else args.bucket_mb}, runs))
        group.shutdown()
    pool.shutdown()


# ----------------------------------------------------------------------------- the minimal pair


class ShapedLearner:
    """Mimics `LearnerWorker.export_weights` on one rank, for a model that does not exist: each
    parameter's float32 tensor is made when its bucket is, then cast and packed with the real
    `pack_bucket`; yields the buckets, then the manifest (with its own timings)."""

    def __init__(self, shapes: list, bucket_mb: int, dtype: str):
        import torch

        torch.set_num_threads(1)
        self.shapes, self.bucket_bytes = dict(shapes), bucket_mb * 2**20
        self.dtype = getattr(torch, dtype)
        self.generator = torch.Generator().manual_seed(0)

    def export_weights(self, names: list[str]):
        import torch

        from services.backends.weight_buckets import bucket_bytes, pack_bucket

        made = packed_s = stored_s = 0.0
        count = nbytes = 0
        part, size = [], 0
        for i, name in enumerate(names):
            t = time.perf_counter()
            part.append((name, torch.empty(self.shapes[name]).uniform_(-0.05, 0.05, generator=self.generator)))
            made += time.perf_counter() - t
            size += part[-1][1].numel() * 4
            if size >= self.bucket_bytes or i == len(names) - 1:
                t = time.perf_counter()
                bucket = pack_bucket(part, self.dtype)
                part, size = [], 0
                t2 = time.perf_counter()
                packed_s += t2 - t
                count, nbytes = count + 1, nbytes + bucket_bytes(bucket)
                yield bucket  # Ray writes it to the object store before the generator resumes
                stored_s += time.perf_counter() - t2
        yield {"buckets": count, "bytes": nbytes, "dtype": str(self.dtype).removeprefix("torch."),
               "make_s": made, "pack_s": packed_s, "store_s": stored_s}


class ShapedEngine:
    """Mimics `RolloutService.load_weights` with an engine that copies every tensor into its
    weights: fetched with the real `iter_bucket_tensors`, copied into a bf16 scratch buffer."""

    def __init__(self, max_numel: int):
        import torch

        torch.set_num_threads(1)
        self.scratch = torch.empty(max_numel, dtype=torch.bfloat16)

    def load_weights(self, version: int, handle) -> dict:
        from services.backends.weight_buckets import iter_bucket_tensors

        t0 = time.perf_counter()
        n = 0
        for bucket in iter_bucket_tensors(handle):
            for _, t in bucket:
                self.scratch[: t.numel()].view(t.shape).copy_(t)
                n += t.numel() * t.element_size()
        return {"sync_s": time.perf_counter() - t0, "sync_bytes": n, "policy_version": version}


def slices(shapes: list, limit_bytes: float, dtype_bytes: int) -> list[list[str]]:
    out, cur, size = [], [], 0
    for name, shape in shapes:
        b = numel(shape) * dtype_bytes
        if cur and size + b > limit_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += b
    return out + ([cur] if cur else [])


def pair_sync(learner, engine, parts: list[list[str]], version: int) -> dict:
    """One sync of the whole model, slice by slice, each end to end; the slices' refs are dropped
    before the next slice is exported."""
    import ray

    from services.learner.sync import bucket_refs

    tot = {"export_s": 0.0, "load_s": 0.0, "engine_s": 0.0, "total_s": 0.0, "bytes": 0, "store_bytes": 0,
           "objects": 0, "make_s": 0.0, "pack_s": 0.0, "store_s": 0.0}
    for names in parts:
        t0 = time.perf_counter()
        handle = bucket_refs([learner.export_weights.remote(names)], 3600.0)
        t1 = time.perf_counter()
        stats = ray.get(engine.load_weights.remote(version, handle))
        t2 = time.perf_counter()
        m = handle.manifest
        made = m["make_s"]  # making random weights is not part of a sync
        tot["export_s"] += t1 - t0 - made
        tot["load_s"] += t2 - t1
        tot["engine_s"] += stats["sync_s"]
        tot["total_s"] += t2 - t0 - made
        tot["bytes"] += stats["sync_bytes"]
        tot["store_bytes"] += store_bytes(handle.buckets)
        tot["objects"] += len(handle.buckets)
        for k in ("make_s", "pack_s", "store_s"):
            tot[k] += m[k]
        del handle
    return tot


def bench_pair(args, name: str, shape: dict) -> None:
    import ray

    shapes = qwen2_shapes(**shape)
    params = sum(numel(s) for _, s in shapes)
    parts = slices(shapes, args.slice_gb * 1e9, 2)
    learner = ray.remote(ShapedLearner).options(num_cpus=1).remote(shapes, args.bucket_mb, "bfloat16")
    engine = ray.remote(ShapedEngine).options(num_cpus=1).remote(max(numel(s) for _, s in shapes))
    runs = [pair_sync(learner, engine, parts, v) for v in range(args.pair_repeats + 1)][1:]
    row = summarize({"case": name, "path": "buckets", "dtype": "bfloat16", "params": params,
                     "actors": "minimal pair: ShapedLearner -> ShapedEngine (bf16 scratch)", "bucket_mb": args.bucket_mb,
                     "slices": len(parts)}, runs)
    row.update({k: round(statistics.median(r[k] for r in runs), 3) for k in ("make_s", "pack_s", "store_s")})
    emit(row)
    if not shape["tied"]:  # the 0.5B's current path is measured (0.5b-real)
        emit({"case": name, "path": "current", "dtype": "float32", "params": params, "measured": False,
              "bytes": params * 4, "note": "computed, not measured: the float32 full dict as one object (what "
              "state_dict_ref ships) cannot exist on this 24 GB machine beside its object-store copy"})
    ray.kill(learner)
    ray.kill(engine)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="tiny-real,0.5b-real,0.5b-pair,7b-pair")
    p.add_argument("--paths", default="current,buckets",
                   help="real cases: the float32 full dict (current) and/or the buckets (default both)")
    p.add_argument("--repeats", type=int, default=3, help="timed syncs per real case, after one warm-up (default 3)")
    p.add_argument("--pair-repeats", type=int, default=1, help="timed syncs per pair case, after one warm-up (default 1)")
    p.add_argument("--transports", action="store_true",
                   help="real cases: the bucketed sync through the object store against the collective "
                        "(learner.sync_transport), A/B/B/A, instead of --paths")
    p.add_argument("--dtypes", default="float32,bfloat16", help="with --transports: the sync dtypes (default both)")
    p.add_argument("--bucket-mb", type=int, default=64, help="learner.sync_bucket_mb (default 64)")
    p.add_argument("--slice-gb", type=float, default=4.0, help="7B: bf16 GB of buckets synced per slice (default 4)")
    p.add_argument("--object-store-gb", type=float, default=8.0, help="the local Ray's object store (default 8)")
    p.add_argument("--workdir", default=None, help="where the 0.5B model is written (default: the temp dir)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    start_ray(args.object_store_gb)
    cases = args.cases.split(",")
    if "tiny-real" in cases:  # the default job's model and learners (2 ranks), as a step syncs them
        from services.config import ModelConfig
        from services.model.tiny import resolve_model_path

        bench_real(args, "tiny-real", resolve_model_path(ModelConfig()), workers=2, cpus=1.0)
    if "0.5b-real" in cases:
        t0 = time.perf_counter()
        root = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=args.workdir))
        try:
            path = build_model_dir(QWEN_05B, root)
            emit({"setup": "0.5b model written", "seconds": round(time.perf_counter() - t0, 1)})
            bench_real(args, "0.5b-real", path, workers=1, cpus=1.0)
        finally:
            shutil.rmtree(root, ignore_errors=True)  # 2 GB of float32 safetensors
    if "0.5b-pair" in cases:
        bench_pair(args, "0.5b-pair", QWEN_05B)
    if "7b-pair" in cases:
        bench_pair(args, "7b-pair", QWEN_7B)


if __name__ == "__main__":
    main()
