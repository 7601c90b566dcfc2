"""The rollout service: one engine behind one actor (the pool of them: services/rollout/pool.py).

`RolloutService` is a plain class (so tests and scripts use it without Ray);
`RolloutPool` runs `num_actors` of them as Ray actors and fans calls out. One call may mix
temperatures: the GRPO batch at T=1 and the AEPO regularizer batch at T_reg are two
`SamplingRequest`s of one `generate_many`, which the engine serves in one batch.

Weight sync: after each learner update the driver hands the new weights to `load_weights(version,
weights)`: a `BucketedWeights` from `LearnerGroup.weight_buckets()`, whose buckets learner rank 0
wrote to Ray's object store itself; this actor fetches them one at a time and its engine loads
each before the next (services/learner/sync.py). With `learner.sync_transport: collective` it gets
a `SyncTicket` instead and receives the buckets through a broadcast from learner rank 0
(services/learner/collective.py). Samples carry the policy version they were drawn from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from services.config import RolloutConfig
from services.contracts import Sample
from services.rollout.engines import EngineRequest, make_engine

PromptId = Any  # the driver's PromptItem, or any value: carried through to the samples' `prompt`
# vLLM rejects temperatures above 2; fail before the engine does, naming the setting.
VLLM_MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class SamplingRequest:
    """`n` samples of every prompt at one temperature; None means the RolloutConfig's value."""

    prompts: Sequence[tuple[PromptId, Sequence[int]]]
    n: int
    temperature: float
    top_p: float | None = None
    max_tokens: int | None = None


@dataclass
class RolloutResult:
    """Per request, its samples prompt-major (prompt 0's n samples, then prompt 1's, ...)."""

    samples: list[list[Sample]]
    stats: dict[str, float] = field(default_factory=dict)


def encode_prompts(
    tokenizer, items: Iterable[tuple[PromptId, str]], chat_template: bool = False, system_prompt: str | None = None
) -> list[tuple[PromptId, list[int]]]:
    """(prompt_id, text) pairs → (prompt_id, token ids), the form every engine takes."""
    from services.model.tiny import encode_prompt

    return [(pid, encode_prompt(tokenizer, text, chat_template, system_prompt)) for pid, text in items]


def engine_options(cfg: RolloutConfig) -> dict[str, Any]:
    """The adapter's keyword arguments from the rollout config."""
    if cfg.engine == "hf":
        return {"dtype": cfg.dtype, "max_batch_rows": cfg.max_batch_rows}
    return {
        "dtype": None if cfg.dtype == "auto" else cfg.dtype,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": cfg.max_model_len,
        "enforce_eager": cfg.enforce_eager,
        "sleep_mode": cfg.placement == "colocated",
    }


class RolloutService:
    """One engine, its policy version, and generation statistics."""

    def __init__(self, model_path: str, cfg: RolloutConfig | None = None, seed: int = 0, threads: int | None = None):
        if threads is not None:  # as an actor: as many torch threads as CPUs reserved, no more
            import torch

            torch.set_num_threads(threads)
        self.cfg = cfg or RolloutConfig()
        self.engine = make_engine(self.cfg.engine, model_path, seed=seed, **engine_options(self.cfg))
        self.version = 0
        # colocated with a learner rank (rollout.placement): sleep after generating, wake before the
        # next weights or generation, so the device is the learner's while it trains
        self.sleeps = self.cfg.placement == "colocated"

    def set_threads(self, threads: int) -> int:
        """Torch threads for generation from now on (e.g. more once a run sharing the cores ends)."""
        import torch

        torch.set_num_threads(max(1, int(threads)))
        return torch.get_num_threads()

    def ready(self) -> dict[str, Any]:
        """The engine's name and policy version (a cheap call to await actor start-up)."""
        return {"engine": self.engine.name, "policy_version": self.version,
                "sync_ranks": getattr(self.engine, "sync_ranks", 1)}  # its members in a weight-sync group

    def generate(
        self,
        prompts: Sequence[tuple[PromptId, Sequence[int]]],
        n: int,
        temperature: float,
        seed: int | None = None,
        *,
        top_p: float | None = None,
        max_tokens: int | None = None,
    ) -> list[Sample]:
        """`n` samples of each prompt at `temperature`, prompt-major; top_p/max_tokens default to the config."""
        req = SamplingRequest(prompts, n, temperature, top_p, max_tokens)
        return self.generate_many([req], seed=seed).samples[0]

    def generate_many(self, requests: Sequence[SamplingRequest], seed: int | None = None) -> RolloutResult:
        """Every request in one engine call (temperatures may differ per request)."""
        engine_reqs, owners = [], []
        for r_idx, req in enumerate(requests):
            self._check_temperature(req.temperature)
            for pid, ids in req.prompts:
                engine_reqs.append(
                    EngineRequest(
                        prompt_ids=list(ids),
                        n=req.n,
                        temperature=req.temperature,
                        top_p=self.cfg.top_p if req.top_p is None else req.top_p,
                        max_tokens=self.cfg.max_tokens if req.max_tokens is None else req.max_tokens,
                        seed=seed,
                    )
                )
                owners.append((r_idx, pid))
        t0 = time.perf_counter()
        self.engine.wake_up()
        try:
            outputs = self.engine.generate(engine_reqs)
        finally:
            if self.sleeps:
                self.engine.sleep()
        gen_s = time.perf_counter() - t0
        samples: list[list[Sample]] = [[] for _ in requests]
        for ereq, (r_idx, pid), outs in zip(engine_reqs, owners, outputs):
            for out in outs:
                samples[r_idx].append(
                    Sample(pid, list(ereq.prompt_ids), out.response_ids, out.finish_reason,
                           ereq.temperature, self.version, self.engine.name)
                )
        tokens = sum(len(s.response_ids) for group in samples for s in group)
        stats = {"gen_s": gen_s, "gen_tokens": float(tokens), "gen_tokens_per_s": tokens / max(gen_s, 1e-9)}
        return RolloutResult(samples, stats)

    def _check_temperature(self, temperature: float) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if self.engine.name.startswith("vllm") and temperature > VLLM_MAX_TEMPERATURE:
            raise ValueError(f"vLLM rejects temperature {temperature} > {VLLM_MAX_TEMPERATURE}")

    def load_weights(self, version: int, weights: Any) -> dict[str, float]:
        """Swap in the learner's weights: a `BucketedWeights` (its buckets fetched and loaded one
        at a time; services/backends/weight_buckets.py), a `SyncTicket` (the buckets received
        through the weight-sync group, one at a time, as learner rank 0 broadcasts them;
        services/learner/collective.py), or a whole state dict (HF names; tensors,
        or the numpy arrays `LearnerGroup.state_dict_ref` ships). Returns {'sync_s',
        'policy_version', 'sync_bytes'}."""
        from services.backends.weight_buckets import is_bucketed, iter_bucket_tensors
        from services.backends.wire import from_wire
        from services.learner.collective import SyncTicket, with_host

        t0 = time.perf_counter()
        self.engine.wake_up()  # weights are written into an awake engine (level 1 keeps a host copy)
        if isinstance(weights, SyncTicket):  # learner rank 0 broadcasts them meanwhile
            nbytes = self.engine.receive_weight_buckets(with_host(weights))
        elif is_bucketed(weights):
            self.engine.load_weight_buckets(iter_bucket_tensors(weights))
            nbytes = weights.nbytes
        else:
            state = from_wire(weights)
            self.engine.load_weights(state)
            nbytes = sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "element_size"))
        self.version = int(version)
        return {"sync_s": time.perf_counter() - t0, "policy_version": float(self.version), "sync_bytes": float(nbytes)}

    def get_policy_version(self) -> int:
        """The version of the weights the engine samples from (0 = the initial checkpoint)."""
        return self.version

    def pid(self) -> int:
        """This actor's process id (the chaos run kills it)."""
        import os

        return os.getpid()

    def close(self) -> None:
        """Release the engine."""
        self.engine.close()
