"""The entropy controller: the pure rule (controller.rule) plus state, persistence and metrics.

The learners publish each step's entropy here, every measured source at once (`publish`); the
rollout service asks for AEPO's regularizer plan here (`plan`), and the driver asks for a rival
rule's levers on the loss (the same `plan`), both from the configured source
(`controller.entropy_source`). The driver never computes a decision. With a Redis URL the state
(last observation per source, the relative target's base H0, the decision log's tail) lives in
Redis, so a restarted controller makes the same next decision; otherwise it lives in memory.

`ControllerCore` is plain Python (unit-tested with an in-memory store and a fake metrics sink);
`EntropyControllerActor` is the Ray actor around it (named, detached-capable). Its decisions
reach Prometheus through the driver's per-step exporter (services/loop/metrics.py says why).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Protocol

from controller.client import PUBLISHED, UNMEASURED, LocalControllerClient
from controller.rule import Plan, decide as decide_rival, plan as decide, target_at
from services.config import CONTROLLED_TYPES, RIVAL_TYPES, AlgorithmConfig, ControllerConfig
from services.contracts import ControllerStateLost

SOURCES = tuple(PUBLISHED)  # exact, sampled, content, forking


class StateStore(Protocol):
    """Where the controller keeps its state (memory or Redis)."""

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


class MemoryStore:
    """State in this process only (the embedded default)."""

    def __init__(self) -> None:
        self._state: dict | None = None

    def load(self) -> dict | None:
        return json.loads(json.dumps(self._state)) if self._state is not None else None

    def save(self, state: dict) -> None:
        self._state = json.loads(json.dumps(state))


class RedisStore:
    """State as one JSON document under `aepo:controller:<run_id>` (atomic SET per update).

    A Redis outage is retried for `retry_s` (a restarting Redis, a failover), then reported with
    the URL and the run it belongs to; the controller never continues on a state it could not save.
    """

    def __init__(self, url: str, run_id: str, timeout_s: float = 5.0, retry_s: float = 30.0) -> None:
        import redis

        self.key = f"aepo:controller:{run_id}"
        self.url, self.retry_s = url, retry_s
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._retry("reach", self._redis.ping)  # fail at start, with the URL in the message, not at the first step

    def _retry(self, what: str, call):
        import redis

        deadline, wait = time.monotonic() + self.retry_s, 0.1
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + wait > deadline:
                    raise RuntimeError(f"Redis at {self.url} unreachable for {self.retry_s:g} s: could not {what} "
                                       f"the controller state {self.key} ({exc})") from exc
                time.sleep(wait)
                wait = min(wait * 2, 2.0)

    def load(self) -> dict | None:
        raw = self._retry("load", lambda: self._redis.get(self.key))
        return json.loads(raw) if raw else None

    def save(self, state: dict) -> None:
        self._retry("save", lambda: self._redis.set(self.key, json.dumps(state)))


class MetricsSink(Protocol):
    """Where the controller reports what it observed and decided."""

    def observed(self, source: str, entropy: float, target: float | None) -> None: ...

    def planned(self, plan: Plan) -> None: ...

    def selected(self, n: int) -> None: ...


class NullMetrics:
    """A metrics sink that drops everything (the default)."""

    def observed(self, source: str, entropy: float, target: float | None) -> None:
        pass

    def planned(self, plan: Plan) -> None:
        pass

    def selected(self, n: int) -> None:
        pass


class ControllerCore:
    """Decides each step's regularizer plan from the entropy the learners published."""

    def __init__(
        self,
        algorithm: AlgorithmConfig,
        config: ControllerConfig,
        run_id: str,
        store: StateStore | None = None,
        metrics: MetricsSink | None = None,
        log_tail: int = 500,
        restarted: bool = False,
    ) -> None:
        self.algorithm, self.config, self.run_id = algorithm, config, run_id
        self.store = store or MemoryStore()
        self.metrics = metrics or NullMetrics()
        self.log_tail = log_tail
        stored = self.store.load()
        # a restarted controller with nothing stored would plan "entropy up" from a zero integral:
        # it refuses every call until the driver hands its state back (`restore`)
        self._lost = restarted and stored is None
        self._state = stored or {"run_id": run_id, "last": {}, "log": [], "selected": {}, "target_base": None}
        if self._state.get("run_id") != run_id:
            raise ValueError(f"stored controller state belongs to run {self._state.get('run_id')!r}, not {run_id!r}")

    def _check_state(self) -> None:
        if self._lost:
            raise ControllerStateLost("controller", f"the controller of run {self.run_id!r} restarted with an empty "
                                      f"{type(self.store).__name__}; it serves again once the driver restores its state")

    # ------------------------------------------------------------------ the learners' side
    def observe(self, step: int, entropy: float, source: str = "exact") -> dict:
        """Record the entropy the learners measured after `step` for one source (`SOURCES`)."""
        self._check_state()
        last = self._observe(step, entropy, source)
        self.store.save(self._state)
        return last

    def publish(self, step: int, entropies: dict[str, float], selected: int | None = None) -> None:
        """One step's measurements from the learners (one store write): the entropy per source,
        and how many regularizer rows the step trains on, kept in the decision log beside the plan.
        A step without the configured source is refused before anything is recorded: the controller
        never plans from another signal than the one configured."""
        self._check_state()
        wanted = self.config.entropy_source
        if wanted not in entropies:
            why = UNMEASURED.get(wanted, "the learners did not send it")
            raise ValueError(f"controller.entropy_source {wanted!r} was not measured at step {step}: {why}. "
                             f"Measured: {', '.join(sorted(entropies)) or 'nothing'}; choose one of those.")
        for source, entropy in entropies.items():
            self._observe(step, entropy, source)
        if selected is not None:
            self._state["selected"] = {"step": int(step), "n": int(selected)}
            for e in reversed(self._state["log"]):
                if e["step"] == step:
                    e["selected"] = int(selected)
                    break
            self.metrics.selected(int(selected))
        self.store.save(self._state)

    def _observe(self, step: int, entropy: float, source: str) -> dict:
        if source not in SOURCES:
            raise ValueError(f"unknown entropy source {source!r} (known: {', '.join(SOURCES)})")
        entropy = float(entropy)
        if not math.isfinite(entropy) or entropy < 0:
            raise ValueError(f"entropy must be finite and >= 0, got {entropy}")
        last = self._state["last"].get(source)
        if last is not None and step < last["step"]:
            raise ValueError(f"observation for step {step} arrived after step {last['step']} ({source})")
        self._state["last"][source] = {"step": int(step), "entropy": entropy, "time": time.time()}
        base = self._state.get("target_base")
        # H0: the controlled signal's first value; a repeat of that step (a retried step 0) replaces it
        if source == self.config.entropy_source and (base is None or (base["source"] == source and step <= base["step"])):
            self._state["target_base"] = {"source": source, "step": int(step), "entropy": entropy}
        self.metrics.observed(source, entropy, self.target(step))
        return self._state["last"][source]

    # ------------------------------------------------------------------ the rollout service's side
    def plan(self, step: int) -> dict:
        """The decision for `step`: AEPO's regularizer plan {temperature, m, target, direction,
        reason, entropy, weight}, or a rival rule's levers {entropy_coef, positive_weight,
        negative_weight, prob_threshold, alpha, target, direction, reason, entropy}."""
        if not self._has_target:
            raise ValueError(f"algorithm {self.algorithm.type!r} has no entropy target to plan for")
        self._check_state()
        seen = self._state["last"].get(self.config.entropy_source)
        entropy = seen["entropy"] if seen is not None else None
        if isinstance(self.algorithm, RIVAL_TYPES):
            return self._log_entry(step, entropy, self._rival_decision(step, entropy))
        # the PI rule's integral: planning the same step again (a retried step, a resumed run)
        # starts from the integral before that step, so it is never counted twice
        pi = self._state.get("pi") or {"step": -1, "before": 0.0, "after": 0.0}
        before = pi["before"] if pi["step"] == step else pi["after"]
        p = decide(entropy, step, self.algorithm.target, self.algorithm.rule, integral=before, base=self._base())
        if p.integral is not None:
            self._state["pi"] = {"step": int(step), "before": before, "after": p.integral}
        self.metrics.planned(p)
        return self._log_entry(step, entropy, p.to_dict())

    def _rival_decision(self, step: int, entropy: float | None) -> dict:
        """A rival rule's levers; its state (Skywork's coefficient, EntroPIC's integral) is kept
        before and after each step, so a retried or resumed step starts from the state before it."""
        rival = self._state.get("rival") or {"step": -1, "before": None, "after": None}
        before = rival["before"] if rival["step"] == step else rival["after"]
        target = self.target(step)  # None only before H0 of a relative target, when nothing is observed
        decision, after = decide_rival(self.algorithm.rule, entropy, step, 0.0 if target is None else target, before)
        self._state["rival"] = {"step": int(step), "before": before, "after": after}
        return {**decision, "target": target}

    def _log_entry(self, step: int, entropy: float | None, decision: dict) -> dict:
        entry = {"step": int(step), "entropy": entropy, **decision}
        log = [e for e in self._state["log"] if e["step"] != step] + [entry]
        self._state["log"] = log[-self.log_tail :]
        self.store.save(self._state)
        return entry

    def restore(self, state: dict) -> None:
        """Load a state saved by `state()` (a checkpoint's copy), for a controller without Redis."""
        if state.get("run_id") != self.run_id:
            raise ValueError(f"checkpointed controller state belongs to run {state.get('run_id')!r}, not {self.run_id!r}")
        self._state = {k: json.loads(json.dumps(state.get(k, default))) for k, default in
                       (("run_id", self.run_id), ("last", {}), ("log", []), ("selected", {}), ("pi", None),
                        ("rival", None), ("target_base", None))}
        self.store.save(self._state)
        self._lost = False

    # ------------------------------------------------------------------ inspection
    def target(self, step: int) -> float | None:
        """The absolute entropy target at `step`, in nats; None for an algorithm without one (GRPO,
        the baselines) and for a relative target before H0 is known."""
        return target_at(self.algorithm.target, step, self._base()) if self._has_target else None

    def _base(self) -> float | None:
        """H0 of a relative target: the configured source's first observed value (None before it,
        and for an absolute target, which needs none)."""
        base = self._state.get("target_base")
        if base is None or not self.algorithm.target.relative:
            return None
        if base["source"] != self.config.entropy_source:
            raise ValueError(f"the relative target's base H0 = {base['entropy']:.4f} was measured on source "
                             f"{base['source']!r} (step {base['step']}); this run controls "
                             f"{self.config.entropy_source!r}: resume with controller.entropy_source: {base['source']} "
                             "or start a new run")
        return base["entropy"]

    def state(self) -> dict[str, Any]:
        """Everything the controller knows: last observations, the decision log tail, its store."""
        self._check_state()  # a blank state handed out as a copy would become the reset it hides
        return {
            **json.loads(json.dumps(self._state)),
            "entropy_source": self.config.entropy_source,
            "store": "redis" if isinstance(self.store, RedisStore) else "memory",
        }

    @property
    def _has_target(self) -> bool:  # an entropy target: AEPO or a rival rule
        return isinstance(self.algorithm, CONTROLLED_TYPES)


class EntropyControllerActor(LocalControllerClient):
    """Ray actor body: the local client around a `ControllerCore`, run remotely; create it with
    `start_controller` (named, so dashboards and drivers can find it) and call it through
    `controller.client.RayControllerClient`."""

    def __init__(self, algorithm: dict, config: dict, run_id: str) -> None:
        import ray
        from pydantic import TypeAdapter

        alg = TypeAdapter(AlgorithmConfig).validate_python(algorithm)
        cfg = ControllerConfig.model_validate(config)
        store = RedisStore(cfg.redis_url, run_id) if cfg.redis_url else MemoryStore()
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        super().__init__(ControllerCore(alg, cfg, run_id, store=store, restarted=restarted))

    def pid(self) -> int:
        """This actor's process id (the chaos run kills it)."""
        import os

        return os.getpid()


def start_controller(algorithm: AlgorithmConfig, config: ControllerConfig, run_id: str, detached: bool = False,
                     max_restarts: int = 3):
    """Create (or reuse, by name) the controller actor in the current Ray cluster.

    A crashed controller is restarted by Ray (max_restarts) and its calls retried; with Redis it
    resumes its state, without it refuses to serve until the driver restores it.
    """
    import ray

    cls = ray.remote(EntropyControllerActor)
    options: dict[str, Any] = {
        "name": config.name,
        "get_if_exists": True,
        "max_restarts": max_restarts,
        "max_task_retries": max_restarts,
        "num_cpus": 0,
        "resources": dict(config.resources),
    }
    if detached:
        options["lifetime"] = "detached"
    return cls.options(**options).remote(algorithm.model_dump(mode="json"), config.model_dump(mode="json"), run_id)
