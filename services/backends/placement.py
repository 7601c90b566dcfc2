"""Where the GPU roles run: `split` or `colocated` (rollout.placement).

split (default): the learners reserve a placement group of their own (one bundle per rank) and each
rollout actor reserves `rollout.gpus_per_actor` beside them: a GPU recipe needs learner GPUs +
engine GPUs.

colocated: the run owns one placement group with a bundle per learner rank, {CPU: the rank's CPUs
(+ the engine's for the first `rollout.num_actors` bundles), GPU: 1 on a GPU cluster}. Learner rank i
and rollout actor i are scheduled into bundle i and each reserves half of its GPU (Ray's fractional
GPUs: both processes see the same device), so a recipe needs max(ranks, engines) GPUs. Memory is
shared in time, not in space: the engine sleeps while the learners train (vLLM's sleep mode, level 1:
weights copied to host memory, KV cache freed; services/rollout/service.py) and wakes before it
loads weights or generates; the learners' sharded parameters and optimizer state stay resident, which
`aepo plan` adds to the engine's reservation. The group belongs to the system, not to either role:
replacing the learners or the engines after a failure (services/loop/recovery.py) reuses the
bundles and never takes the other role's actors down with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GPU_SHARE = 0.5  # of a bundle's GPU, for the learner rank and for the engine on it


@dataclass
class SharedBundles:
    """The colocated run's placement group and the Ray options each role's actors take in it."""

    pg: Any
    gpu: bool
    learner_cpus: float
    rollout_cpus: float

    def learner_options(self, rank: int) -> dict[str, Any]:
        return self._options(rank, self.learner_cpus)

    def rollout_options(self, index: int) -> dict[str, Any]:
        return self._options(index, self.rollout_cpus)

    def _options(self, bundle: int, cpus: float) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": cpus, "num_gpus": GPU_SHARE if self.gpu else 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)}

    def remove(self) -> None:
        from services.learner.group import remove_pg

        remove_pg(self.pg)


def colocated_bundles(learner, rollout, gpu: bool, timeout_s: float) -> SharedBundles:
    """Reserve the shared bundles (learner: LearnerConfig, rollout: RolloutConfig); RoleTimeout names
    what could not be placed and what the cluster has."""
    import ray
    from ray.util.placement_group import placement_group

    from services.contracts import RoleTimeout
    from services.learner.group import remove_pg

    bundles = []
    for i in range(learner.num_workers):
        cpus = learner.cpus_per_worker + (rollout.cpus_per_actor if i < rollout.num_actors else 0.0)
        bundles.append({"CPU": cpus, **({"GPU": 1} if gpu else {}), **learner.resources})
    pg = placement_group(bundles, strategy=learner.placement_strategy)
    if not pg.wait(timeout_seconds=timeout_s):
        remove_pg(pg)
        raise RoleTimeout("learner", f"colocated placement group of {bundles} (learner ranks with their rollout "
                          f"engines) not placed within {timeout_s:g} s; the cluster has {ray.cluster_resources()}")
    return SharedBundles(pg, gpu, learner.cpus_per_worker, rollout.cpus_per_actor)


CONTEXT_BYTES = 2 * 2**30  # two processes' CUDA contexts on the GPU (the learner's NCCL included)


def colocated_refusal(cfg, params: int | None, gpu_memory: int | None) -> str | None:
    """`aepo plan`: while a colocated vLLM engine is awake, the learner rank beside it keeps its
    sharded fp32 parameters, gradients and AdamW moments (16 P / N) on the same GPU; the engine's
    reservation (gpu_memory_utilization x the GPU) must leave room for them. None when it fits or
    nothing is known."""
    rc = cfg.rollout
    if rc.placement != "colocated" or rc.engine != "vllm" or params is None or gpu_memory is None:
        return None
    resting = 16 * params / cfg.learner.num_workers + CONTEXT_BYTES
    reserve = rc.gpu_memory_utilization * gpu_memory
    if reserve + resting <= gpu_memory:
        return None
    most = max(0.0, (gpu_memory - resting) / gpu_memory)
    return (f"refused: colocated: the vLLM engine reserves {reserve / 2**30:.1f} GiB ({rc.gpu_memory_utilization:g} x "
            f"{gpu_memory / 2**30:.1f} GiB) beside its learner rank's resting {resting / 2**30:.1f} GiB (16 P / N + "
            f"CUDA contexts): lower rollout.gpu_memory_utilization to {most:.2f} or less, or add learner ranks")
