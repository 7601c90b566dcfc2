"""The learner group (driver side): N LearnerWorker Ray actors in one placement group, one process group."""

from __future__ import annotations

import os
from typing import Any

import torch

from controller.client import ControllerClient
from services.config import AlgorithmConfig, LearnerConfig
from services.learner.batch import TrainBatch, shard_batch, shard_for_ranks
from services.learner.worker import LearnerWorker


def _resolve_device(cfg: LearnerConfig) -> str:
    """cuda when asked, or (auto) when the cluster has a GPU for every worker."""
    if cfg.device != "auto":
        return cfg.device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) >= cfg.num_workers else "cpu"


class LearnerGroup:
    """`cfg.num_workers` LearnerWorker actors in one placement group, forming one process group."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algorithm: AlgorithmConfig, seed: int = 0):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg, self.world_size = cfg, cfg.num_workers
        self.device = _resolve_device(cfg)
        gpus = 1 if self.device == "cuda" else 0
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy=cfg.placement_strategy)
        ray.get(self.pg.ready())
        remote_cls = ray.remote(LearnerWorker)
        self.workers = [
            remote_cls.options(
                num_cpus=cfg.cpus_per_worker,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(rank, self.world_size, model_path, cfg, algorithm, seed, self.device)
            for rank in range(self.world_size)
        ]
        # rank 0's node hosts the rendezvous: its IP (127.0.0.1 on a loopback-only cluster) and a
        # port that is free there
        addr, port = ray.get(self.workers[0].master_address.remote())
        ray.get([w.setup.remote(addr, port) for w in self.workers])
        self.compute = ray.get(self.workers[0].compute_info.remote())

    def _fan_out(self, method: str, *per_rank_args) -> list[Any]:
        import ray

        if per_rank_args:
            refs = [getattr(w, method).remote(*args) for w, args in zip(self.workers, zip(*per_rank_args))]
        else:
            refs = [getattr(w, method).remote() for w in self.workers]
        return ray.get(refs)

    def update(
        self, batch: TrainBatch, step: int | None = None, controller: ControllerClient | None = None
    ) -> dict[str, float]:
        """One RL update on the global batch; stats are global (all-reduced), taken from rank 0.

        `controller` (a `RayControllerClient`; it travels to the actors): rank 0 publishes the
        step's entropy to it.
        """
        shards = shard_for_ranks(batch, self.world_size, self.cfg)
        n = self.world_size
        return self._fan_out("update", shards, [step] * n, [controller] * n)[0]

    def compute_logprobs(self, batch: TrainBatch, temperature: float = 1.0) -> torch.Tensor:
        """log π_T of every token given its prefix, [B, L] (column 0 is 0), no grad."""
        shards = shard_batch(batch, self.world_size, 1)
        parts = self._fan_out("compute_logprobs", shards, [temperature] * self.world_size)
        return torch.cat(parts)[: len(batch)]

    def state_dict_ref(self):
        """ObjectRef of the full (unsharded, CPU) state dict, gathered once; pass it to
        `RolloutPool.load_weights` so Ray ships it to every rollout actor from the object store."""
        import ray

        refs = [w.full_state_dict_wire.remote() for w in self.workers]
        ray.get(refs[1:])  # the others only take part in the gather
        ray.wait(refs[:1])
        return refs[0]

    def get_full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict itself (tests, export): tensors of their own (writable)."""
        import ray

        from services.backends.wire import from_wire

        return {k: v.clone() for k, v in from_wire(ray.get(self.state_dict_ref())).items()}

    def save_checkpoint(self, path: str) -> None:
        """Sharded model + optimizer state under `path` (a directory every worker can reach)."""
        # absolute: the workers' working directories are Ray's, not the driver's
        self._fan_out("save_checkpoint", [os.path.abspath(path)] * self.world_size)

    def load_checkpoint(self, path: str) -> None:
        """Restore model + optimizer state saved by `save_checkpoint`."""
        self._fan_out("load_checkpoint", [os.path.abspath(path)] * self.world_size)

    def shutdown(self) -> None:
        """Leave the process group, end the actors, free the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            self._fan_out("shutdown")
        finally:
            for w in self.workers:
                ray.kill(w)
            remove_placement_group(self.pg)
            self.workers = []
