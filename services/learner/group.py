"""The learner group (driver side): N LearnerWorker Ray actors in one placement group, one process group."""

from __future__ import annotations

import os
from typing import Any

import torch

from controller.client import ControllerClient
from services.backends.remote import wait_all
from services.config import AlgorithmConfig, LearnerConfig, RecoveryConfig
from services.contracts import RoleTimeout
from services.learner.batch import TrainBatch, shard_batch, shard_for_ranks
from services.learner.worker import LearnerWorker


def _resolve_device(cfg: LearnerConfig) -> str:
    """cuda when asked, or (auto) when the cluster has a GPU for every worker; cpu (auto) on a
    cluster without GPUs. A cluster with some GPUs but fewer than the workers is an error: falling
    back to the CPU there would run a GPU-sized model on host memory, silently."""
    if cfg.device != "auto":
        return cfg.device
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= cfg.num_workers:
        return "cuda"
    if gpus > 0:
        raise ValueError(f"learner.device auto: the cluster has {gpus:g} GPUs for {cfg.num_workers} learner workers; "
                         f"set learner.num_workers to {int(gpus)} or fewer, or learner.device: cpu to train on the CPUs")
    return "cpu"


def check_transport(cfg: LearnerConfig, device: str, colocated: bool) -> None:
    """Refuse a collective weight sync NCCL cannot run: colocated, learner rank 0 and rollout engine 0
    share one GPU, and NCCL refuses a communicator with two ranks on one device ("Duplicate GPU
    detected"). Gloo (CPU learners) has no such rule."""
    if cfg.sync_transport == "collective" and device == "cuda" and colocated:
        raise ValueError("learner.sync_transport collective with rollout.placement colocated on GPUs: NCCL refuses two "
                         "ranks on one GPU (learner rank 0 and its engine share one); use sync_transport object_store "
                         "(the default) or rollout.placement split")


class LearnerGroup:
    """`cfg.num_workers` LearnerWorker actors in one placement group, forming one process group."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algorithm: AlgorithmConfig, seed: int = 0,
                 recovery: RecoveryConfig | None = None, bundles=None):
        import ray

        self.cfg, self.world_size = cfg, cfg.num_workers
        self.recovery = rc = recovery or RecoveryConfig()
        self.device = _resolve_device(cfg)
        check_transport(cfg, self.device, colocated=bundles is not None)
        self.workers: list = []
        # colocated (services/backends/placement.py): the run's shared bundles, which outlive this group
        self._own_pg = bundles is None
        self.pg = self._placement_group() if bundles is None else bundles.pg
        remote_cls = ray.remote(LearnerWorker)
        self.workers = [
            remote_cls.options(**(self._options(rank) if bundles is None else bundles.learner_options(rank)))
            .remote(rank, self.world_size, model_path, cfg, algorithm, seed, self.device)
            for rank in range(self.world_size)
        ]
        # rank 0's node hosts the rendezvous: its IP (127.0.0.1 on a loopback-only cluster) and a
        # port that is free there
        (addr, port), = wait_all([self.workers[0].master_address.remote()], rc.start_timeout_s, "learner", "rank 0's address")
        wait_all([w.setup.remote(addr, port, rc.collective_timeout_s) for w in self.workers], rc.start_timeout_s,
                 "learner", "learners joining the process group and loading the model")
        self.compute = self._fan_out("compute_info")[0]
        self.updates = 0  # weight changes so far: a kept collective handle is valid only while it stands

    def _fan_out(self, method: str, *per_rank_args, timeout_s: float | None = None) -> list[Any]:
        if per_rank_args:
            refs = [getattr(w, method).remote(*args) for w, args in zip(self.workers, zip(*per_rank_args))]
        else:
            refs = [getattr(w, method).remote() for w in self.workers]
        return wait_all(refs, timeout_s or self.recovery.learner_timeout_s, "learner", f"learners: {method}")

    def update(
        self, batch: TrainBatch, step: int | None = None, controller: ControllerClient | None = None,
        levers: dict | None = None,
    ) -> dict[str, float]:
        """One RL update on the global batch; stats are global (all-reduced), taken from rank 0.

        `controller` (a `RayControllerClient`; it travels to the actors): rank 0 publishes the
        step's entropy to it. `levers`: a rival controller's decision, applied by every rank.
        """
        shards = shard_for_ranks(batch, self.world_size, self.cfg)
        n = self.world_size
        self.updates += 1
        return self._fan_out("update", shards, [step] * n, [controller] * n, [levers] * n)[0]

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
        # the others only take part in the gather; rank 0's result stays in the object store
        wait_all(refs[1:], self.recovery.sync_timeout_s, "learner", "learners: gathering the weights")
        ready, _ = ray.wait(refs[:1], timeout=self.recovery.sync_timeout_s, fetch_local=False)
        if not ready:
            raise RoleTimeout("learner", f"rank 0 did not gather the weights within {self.recovery.sync_timeout_s:g} s")
        return refs[0]

    def weight_buckets(self):
        """The weight sync's handle (`BucketedWeights`): rank 0's buckets, each written to the object
        store by rank 0 itself, as refs the driver never resolves (services/learner/sync.py); pass
        it to `RolloutPool.load_weights`. `state_dict_ref` is the one-float32-object way. With
        `sync_transport: collective` a `CollectiveWeights` instead: the pool runs the broadcast."""
        from services.learner.collective import CollectiveWeights
        from services.learner.sync import bucket_refs

        if self.cfg.sync_transport == "collective":  # sent when the pool receives: services/learner/collective.py
            backend = "nccl" if self.device == "cuda" else "gloo"
            return CollectiveWeights(self, self.updates, {"transport": "collective", "backend": backend})
        return bucket_refs([w.export_weights.remote() for w in self.workers], self.recovery.sync_timeout_s)

    def get_full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict itself (tests, export): tensors of their own (writable)."""
        import ray

        from services.backends.wire import from_wire

        (sd,) = wait_all([self.state_dict_ref()], self.recovery.sync_timeout_s, "learner", "fetching the weights")
        return {k: v.clone() for k, v in from_wire(sd).items()}

    def save_checkpoint(self, path: str) -> dict[str, int]:
        """Sharded model + optimizer state under `path` (a directory every worker can reach); every
        rank fsyncs what it wrote. Returns {file: bytes} of every rank's files, for the manifest."""
        # absolute: the workers' working directories are Ray's, not the driver's
        written: dict[str, int] = {}
        for files in self._fan_out("save_checkpoint", [os.path.abspath(path)] * self.world_size):
            written.update(files)
        return written

    def load_checkpoint(self, path: str) -> None:
        """Restore model + optimizer state saved by `save_checkpoint`."""
        self.updates += 1
        self._fan_out("load_checkpoint", [os.path.abspath(path)] * self.world_size)

    def pids(self) -> list[int]:
        """Each rank's process id (the chaos run kills one)."""
        return self._fan_out("pid", timeout_s=60.0)

    def shutdown(self) -> None:
        """Leave the process group, end the actors, free the placement group."""
        try:
            self._fan_out("shutdown", timeout_s=60.0)
        finally:
            self.abort()

    def abort(self) -> None:
        """End the actors without asking them (a rank may be dead or stuck in a collective)."""
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        if self._own_pg:
            remove_pg(self.pg)
        self.workers = []

    def _placement_group(self):
        """One bundle per rank, {CPU, GPU on cuda, the role's custom resources} (split placement)."""
        import ray
        from ray.util.placement_group import placement_group

        cfg, rc = self.cfg, self.recovery
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if self.device == "cuda" else {}), **cfg.resources}
        pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy=cfg.placement_strategy)
        if not pg.wait(timeout_seconds=rc.start_timeout_s):
            remove_pg(pg)
            raise RoleTimeout("learner", f"placement group of {self.world_size} x {bundle} not placed within "
                              f"{rc.start_timeout_s:g} s; the cluster has {ray.cluster_resources()}")
        return pg

    def _options(self, rank: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": self.cfg.cpus_per_worker, "num_gpus": 1 if self.device == "cuda" else 0,
                "resources": dict(self.cfg.resources),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)}


def remove_pg(pg) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - already gone
        pass
