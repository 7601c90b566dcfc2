"""The rollout pool (driver side): `num_actors` RolloutService Ray actors; prompts split, weights broadcast."""

from __future__ import annotations

import time
from typing import Sequence

from services.config import RolloutConfig
from services.contracts import Sample
from services.rollout.service import RolloutResult, RolloutService, SamplingRequest


def rollout_resources(cfg: RolloutConfig) -> dict[str, float]:
    """Ray resources of one rollout actor: vLLM needs a GPU unless told otherwise."""
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if cfg.engine == "vllm" else 0.0)
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus}


def _split(items: Sequence, k: int) -> list[Sequence]:
    """k contiguous, near-equal chunks (the first ones one longer), in order."""
    q, r = divmod(len(items), k)
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return [items[bounds[i] : bounds[i + 1]] for i in range(k)]


class RolloutPool:
    """`cfg.num_actors` RolloutService actors; prompts are split across them, weights broadcast."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int = 0):
        import ray

        self.cfg = cfg
        remote_cls = ray.remote(RolloutService)
        self.actors = [
            remote_cls.options(**rollout_resources(cfg)).remote(model_path, cfg, seed + i, cfg.torch_threads or max(1, int(cfg.cpus_per_actor)))
            for i in range(cfg.num_actors)
        ]
        ray.get([a.ready.remote() for a in self.actors])

    def generate_many(self, requests: Sequence[SamplingRequest], seed: int | None = None) -> RolloutResult:
        """Each request's prompts split contiguously across actors; results merged in order."""
        import ray

        k = len(self.actors)
        per_actor = [[] for _ in range(k)]
        for req in requests:
            for a, chunk in enumerate(_split(list(req.prompts), k)):
                per_actor[a].append(SamplingRequest(chunk, req.n, req.temperature, req.top_p, req.max_tokens))
        t0 = time.perf_counter()
        results = ray.get(
            [actor.generate_many.remote(reqs, None if seed is None else seed + 7919 * a)
             for a, (actor, reqs) in enumerate(zip(self.actors, per_actor))]
        )
        wall = time.perf_counter() - t0
        merged = [[s for res in results for s in res.samples[i]] for i in range(len(requests))]
        tokens = sum(res.stats["gen_tokens"] for res in results)
        stats = {"gen_s": wall, "gen_tokens": tokens, "gen_tokens_per_s": tokens / max(wall, 1e-9)}
        return RolloutResult(merged, stats)

    def generate(self, prompts, n: int, temperature: float, seed=None, *, top_p=None, max_tokens=None) -> list[Sample]:
        """`RolloutService.generate` across the pool."""
        return self.generate_many([SamplingRequest(prompts, n, temperature, top_p, max_tokens)], seed).samples[0]

    def set_threads(self, threads: int) -> list[int]:
        """`RolloutService.set_threads` on every actor."""
        import ray

        return ray.get([a.set_threads.remote(threads) for a in self.actors])

    def load_weights(self, version: int, weights) -> dict[str, float]:
        """Broadcast weights (a state dict or an ObjectRef to one) to every actor; returns sync stats."""
        import ray

        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        t0 = time.perf_counter()
        per_actor = ray.get([a.load_weights.remote(version, ref) for a in self.actors])
        return {
            "sync_s": time.perf_counter() - t0,
            "engine_sync_s": max(r["sync_s"] for r in per_actor),
            "policy_version": float(version),
        }

    def shutdown(self) -> None:
        """Close the engines and end the actors."""
        import ray

        ray.get([a.close.remote() for a in self.actors])
        for a in self.actors:
            ray.kill(a)
        self.actors = []
