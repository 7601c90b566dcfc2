"""The entropy controller as its callers see it: one interface, two ways to reach it.

`ControllerClient` is what the driver, the rollout adapter and the learners call. Two
implementations exist and nothing else re-wraps the controller:

- `LocalControllerClient` holds a `ControllerCore` in this process (the in-process backend,
  tests); the Ray actor (`controller.actor.EntropyControllerActor`) is this same class, run
  remotely.
- `RayControllerClient` calls that actor, with a timeout on every call; it pickles to the
  learners' Ray actors as it is (an actor handle travels), so rank 0 publishes through it.

`publish_entropy` is the one place that says which measured entropy goes to which source
(`PUBLISHED`): every source the step measured reaches the controller in one `publish` call per
step (rank 0 of the learners), which also carries how many regularizer rows the step trains on,
so the driver never reports back. The controller plans from one of them
(`controller.entropy_source`); the metrics row reads the same one (`read_source`).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class ControllerClient(Protocol):
    """Observe entropy (the learners), plan the regularizer (the rollout adapter), state (checkpoints)."""

    def observe(self, step: int, entropy: float, source: str = "exact") -> dict:
        """Record the entropy measured at `step` for `source` (a key of `PUBLISHED`)."""

    def publish(self, step: int, entropies: dict[str, float], selected: int | None = None) -> None:
        """A step's measurements in one call: the entropy per source, and the regularizer rows
        the step trains on (None: not counted)."""

    def plan(self, step: int) -> dict:
        """The regularizer plan for `step`: {temperature, m, weight, target, direction, reason, entropy}."""

    def target(self, step: int) -> float | None:
        """The entropy target at `step`; None when the algorithm has none."""

    def state(self) -> dict:
        """Everything the controller knows (checkpointed by the driver)."""

    def restore(self, state: dict) -> None:
        """Load what `state()` returned."""


class LocalControllerClient:
    """A `ControllerCore` in this process."""

    def __init__(self, core) -> None:
        self.core = core

    def observe(self, step: int, entropy: float, source: str = "exact") -> dict:
        return self.core.observe(step, entropy, source)

    def plan(self, step: int) -> dict:
        return self.core.plan(step)

    def publish(self, step: int, entropies: dict[str, float], selected: int | None = None) -> None:
        self.core.publish(step, entropies, selected)

    def target(self, step: int) -> float | None:
        return self.core.target(step)

    def state(self) -> dict:
        return self.core.state()

    def restore(self, state: dict) -> None:
        self.core.restore(state)


class RayControllerClient:
    """The controller actor, every call waited on for at most `timeout_s`."""

    def __init__(self, handle, timeout_s: float = 120.0) -> None:
        self.handle, self.timeout_s = handle, timeout_s

    def _call(self, method: str, *args) -> Any:
        """A call with a deadline; a dead controller, a silent one and one that lost its state are
        `RoleFailure`s (services/contracts.py) the driver knows how to mend."""
        from services.backends.remote import get_one

        ref = getattr(self.handle, method).remote(*args)
        return get_one(ref, self.timeout_s, "controller", f"entropy controller: {method}")

    def observe(self, step: int, entropy: float, source: str = "exact") -> dict:
        return self._call("observe", step, entropy, source)

    def plan(self, step: int) -> dict:
        return self._call("plan", step)

    def publish(self, step: int, entropies: dict[str, float], selected: int | None = None) -> None:
        self._call("publish", step, entropies, selected)

    def target(self, step: int) -> float | None:
        return self._call("target", step)

    def state(self) -> dict:
        return self._call("state")

    def restore(self, state: dict) -> None:
        self._call("restore", state)


# which measured statistic feeds which controller source: a key of the learners' stats, or a
# path into `token_entropy` (services/learner/stats.py)
PUBLISHED: dict[str, tuple[str, ...]] = {
    "exact": ("entropy",),
    "sampled": ("entropy_sampled_batch",),
    "content": ("token_entropy", "content"),
    "forking": ("token_entropy", "forking"),
}
ALWAYS_MEASURED = ("exact", "sampled")
# why a source can be missing from a step's measurements (the controller's error says it)
UNMEASURED = {
    "content": "the run has no reward-irrelevant tokens (learner.entropy_analysis.irrelevant_tokens is empty, the "
               "default of every task but countdown), so the learners do not split the entropy into irrelevant + content",
    "forking": "the step had no GRPO response tokens to rank by entropy",
}


def read_source(stats: dict, source: str) -> float | None:
    """The value of `source` in a step's learner stats; None when that step did not measure it
    (content without reward-irrelevant tokens, forking without GRPO tokens, a NaN)."""
    value: Any = stats
    for key in PUBLISHED[source]:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def publish_entropy(controller: ControllerClient, step: int, stats: dict) -> None:
    """Send a step's measured entropy to the controller, one observation per measured source, and
    the number of regularizer rows trained on (`reg_selected`), in one call.

    `exact`: the exact full-vocabulary entropy at T=1 over the GRPO rows (the default signal).
    `sampled`: the sampled-token estimate over the whole mixed update batch (GRPO and
    regularizer rows), the signal the reference implementation feeds its controller.
    `content`: the part of `exact` that is not the choice of a reward-irrelevant token (the chain
    rule's split; only with such tokens). `forking`: the mean exact entropy of the top
    `forking_share` (20 %) highest-entropy GRPO tokens (any run with GRPO tokens).
    exact and sampled are sent as measured (the controller refuses a NaN); content and forking
    only where the step measured them: the controller refuses a step without its own source.
    """
    selected = stats.get("reg_selected")
    entropies = {source: stats[PUBLISHED[source][0]] for source in ALWAYS_MEASURED}
    for source in PUBLISHED:
        if source not in ALWAYS_MEASURED and (value := read_source(stats, source)) is not None:
            entropies[source] = value
    controller.publish(step, entropies, None if selected is None else int(selected))
