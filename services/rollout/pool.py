"""The rollout pool (driver side): `num_actors` RolloutService Ray actors; prompts split, weights broadcast.

An actor that dies is restarted by Ray and, before it serves again, re-synced by the pool to the
weights of the current policy version (the pool keeps their bucket refs; with the collective
transport, learner rank 0 broadcasts them again to that actor in a new group); its share of the
call is then run again with the same seed, so the samples are the ones it would have drawn.
Every sample's `policy_version` is checked against the pool's: an engine that serves other
weights than the driver's is an error, never a silent off-policy batch.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from services.backends.remote import get_one, wait_all
from services.config import RecoveryConfig, RolloutConfig
from services.contracts import RoleFailure, RoleTimeout, Sample
from services.rollout.service import RolloutResult, RolloutService, SamplingRequest

log = logging.getLogger("aepo")


def rollout_resources(cfg: RolloutConfig) -> dict:
    """Ray resources of one rollout actor: vLLM needs a GPU unless told otherwise."""
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if cfg.engine == "vllm" else 0.0)
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus, "resources": dict(cfg.resources)}


def _split(items: Sequence, k: int) -> list[Sequence]:
    """k contiguous, near-equal chunks (the first ones one longer), in order."""
    q, r = divmod(len(items), k)
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return [items[bounds[i] : bounds[i + 1]] for i in range(k)]


class RolloutPool:
    """`cfg.num_actors` RolloutService actors; prompts are split across them, weights broadcast."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int = 0, recovery: RecoveryConfig | None = None,
                 bundles=None):
        self.cfg, self.model_path, self.seed = cfg, model_path, seed
        self.bundles = bundles  # colocated: actor i in the run's shared bundle i (services/backends/placement.py)
        self.recovery = recovery or RecoveryConfig()
        self.version, self._weights = 0, None  # what a restarted actor is re-synced to
        self.restarts = 0  # actors revived in place (restarted by Ray, re-synced)
        self._rounds = None  # the weight-sync group of the collective transport (collective_sync.py), made on use
        self.actors = [self._spawn(i) for i in range(cfg.num_actors)]
        wait_all([a.ready.remote() for a in self.actors], self.recovery.start_timeout_s, "rollout", "rollout actors starting")

    def _spawn(self, i: int):
        import ray

        # Ray restarts a crashed actor; its calls are not retried by Ray (the pool re-syncs first)
        where = rollout_resources(self.cfg) if self.bundles is None else self.bundles.rollout_options(i)
        return ray.remote(RolloutService).options(
            max_restarts=max(1, self.recovery.max_recoveries), max_task_retries=0, **where,
        ).remote(self.model_path, self.cfg, self.seed + i, self.cfg.torch_threads or max(1, int(self.cfg.cpus_per_actor)))

    def generate_many(self, requests: Sequence[SamplingRequest], seed: int | None = None) -> RolloutResult:
        """Each request's prompts split contiguously across actors; results merged in order."""
        k = len(self.actors)
        per_actor = [[] for _ in range(k)]
        for req in requests:
            for a, chunk in enumerate(_split(list(req.prompts), k)):
                per_actor[a].append(SamplingRequest(chunk, req.n, req.temperature, req.top_p, req.max_tokens))
        t0 = time.perf_counter()
        results = [self._send(a, "generate_many", reqs, None if seed is None else seed + 7919 * a)
                   for a, reqs in enumerate(per_actor)]
        results = [self._finish(a, r) for a, r in enumerate(results)]
        wall = time.perf_counter() - t0
        merged = [[s for res in results for s in res.samples[i]] for i in range(len(requests))]
        self._check_versions(merged)
        tokens = sum(res.stats["gen_tokens"] for res in results)
        stats = {"gen_s": wall, "gen_tokens": tokens, "gen_tokens_per_s": tokens / max(wall, 1e-9)}
        return RolloutResult(merged, stats)

    def _send(self, a: int, method: str, *args):
        """Start a call on actor `a`; `_finish` waits for it (so the actors run at once)."""
        return method, args, getattr(self.actors[a], method).remote(*args)

    def _finish(self, a: int, pending) -> Any:
        """The pending call's result; a dead or hung actor is revived (re-synced) and asked again, once."""
        method, args, ref = pending
        timeout = self.recovery.sync_timeout_s if method == "load_weights" else self.recovery.rollout_timeout_s
        try:
            return get_one(ref, timeout, "rollout", f"rollout actor {a}: {method}")
        except RoleFailure as exc:
            log.warning("rollout actor %d failed (%s); reviving it on policy version %d", a, exc, self.version)
            if isinstance(exc, RoleTimeout):  # hung: a restart is the only way to get it back
                import ray

                ray.kill(self.actors[a], no_restart=False)
            synced = self._revive(a)
            if method == "load_weights" and synced is not None:  # the revival loaded these very weights
                return synced
            return get_one(getattr(self.actors[a], method).remote(*args), timeout, "rollout",
                           f"rollout actor {a}: {method} (after a restart)")

    def _revive(self, a: int) -> dict | None:
        """Actor `a` restarted (by Ray, or here when it is beyond restarting) and on the current
        weights; returns that re-sync's stats (None while the pool is on the initial weights). With
        the collective transport the re-sync is a round of its own: learner rank 0 and this actor,
        in a new group (the next full sync makes another with every actor)."""
        from services.learner.collective import is_collective

        self._restart(a)
        if self._weights is None:
            return None
        if is_collective(self._weights):
            return self._collective().run(self._weights, self.actors, [a], self.version, self._restart)[0]
        return get_one(self.actors[a].load_weights.remote(self.version, self._weights), self.recovery.sync_timeout_s,
                       "rollout", f"rollout actor {a}: re-sync to policy version {self.version}")

    def _restart(self, a: int) -> None:
        """Actor `a` running again: restarted by Ray, or replaced here when it is beyond restarting."""
        import ray

        if self._rounds is not None:
            self._rounds.forget()  # its old process's group is gone: the next round makes a new one
        try:
            get_one(self.actors[a].ready.remote(), self.recovery.start_timeout_s, "rollout", f"rollout actor {a} restarting")
        except RoleFailure:  # hung, or out of restarts: replace it
            ray.kill(self.actors[a], no_restart=True)
            self.actors[a] = self._spawn(a)
            get_one(self.actors[a].ready.remote(), self.recovery.start_timeout_s, "rollout", f"rollout actor {a} replaced")
        self.restarts += 1

    def _collective(self):
        from services.rollout.collective_sync import CollectiveRounds

        if self._rounds is None:
            self._rounds = CollectiveRounds(self.recovery.sync_timeout_s)
        return self._rounds

    def _check_versions(self, batches: list[list[Sample]]) -> None:
        stale = {s.policy_version for batch in batches for s in batch if s.policy_version != self.version}
        if stale:
            raise RoleFailure("rollout", f"samples drawn with policy version(s) {sorted(stale)}, the driver's is {self.version}")

    def generate(self, prompts, n: int, temperature: float, seed=None, *, top_p=None, max_tokens=None) -> list[Sample]:
        """`RolloutService.generate` across the pool."""
        return self.generate_many([SamplingRequest(prompts, n, temperature, top_p, max_tokens)], seed).samples[0]

    def set_threads(self, threads: int) -> list[int]:
        """`RolloutService.set_threads` on every actor."""
        return wait_all([a.set_threads.remote(threads) for a in self.actors], self.recovery.controller_timeout_s,
                        "rollout", "set_threads")

    def load_weights(self, version: int, weights) -> dict[str, float]:
        """Broadcast weights to every actor; returns sync stats. `weights`: a `BucketedWeights` (the
        learners' bucket refs, passed as they are: each actor fetches the buckets itself), a
        `CollectiveWeights` (learner rank 0 broadcasts to the actors: services/rollout/collective_sync.py),
        or a state dict or an ObjectRef to one. The pool keeps the handle (the bucket refs, so the buckets stay
        in the object store) to re-sync an actor that restarts later."""
        import ray

        from services.backends.weight_buckets import is_bucketed
        from services.learner.collective import is_collective

        if is_collective(weights):  # learner rank 0 broadcasts, every actor receives: one round
            t0 = time.perf_counter()
            self.version, self._weights = int(version), weights
            per_actor = self._collective().run(weights, self.actors, list(range(len(self.actors))), self.version,
                                               self._restart)
            return self._sync_stats(t0, version, per_actor)
        ref = weights if isinstance(weights, ray.ObjectRef) or is_bucketed(weights) else ray.put(weights)
        t0 = time.perf_counter()
        pending = [self._send(a, "load_weights", version, ref) for a in range(len(self.actors))]
        self.version, self._weights = int(version), ref  # an actor revived below must get these weights
        per_actor = [self._finish(a, p) for a, p in enumerate(pending)]
        return self._sync_stats(t0, version, per_actor)

    @staticmethod
    def _sync_stats(t0: float, version: int, per_actor: list[dict]) -> dict[str, float]:
        return {
            "sync_s": time.perf_counter() - t0,
            "engine_sync_s": max(r["sync_s"] for r in per_actor),
            "policy_version": float(version),
            "sync_bytes": sum(r.get("sync_bytes", 0.0) for r in per_actor),  # received by all actors together
        }

    def pids(self) -> list[int]:
        """The actors' process ids (the chaos run kills one)."""
        return wait_all([a.pid.remote() for a in self.actors], self.recovery.controller_timeout_s, "rollout", "pid")

    def shutdown(self) -> None:
        """Close the engines and end the actors (best effort: a dead actor is only killed)."""
        try:
            wait_all([a.close.remote() for a in self.actors], 60.0, "rollout", "closing the engines")
        except Exception as exc:  # noqa: BLE001 - teardown goes on
            log.warning("rollout shutdown: %s", exc)
        self.abort()

    def abort(self) -> None:
        """End the actors without asking them (one may be dead or hung)."""
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
