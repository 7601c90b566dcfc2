"""The step's types and the components' interfaces, as the driver sees them.

A sample's life in one step, one type per stage:

1. `services.rollout.engines.EngineOutput`: what an engine adapter returns (response ids, finish
   reason); it knows nothing of policy versions or prompts.
2. `Sample` (here): the rollout service's result, from the actor to the driver's logs. It carries
   the caller's prompt (the driver's `PromptItem`), the token ids, the temperature and policy
   version it was drawn with; the driver fills in `text` (step 3), then `reward` and `outcome`
   (step 4).
3. `reward_server.schemas.VerifyItem` / `VerifyResult`: the reward API's request and verdict,
   the same types over HTTP and in process.
4. `services.learner.batch.TrainBatch`: the update batch the driver lays out (step 5), one row
   per trained sample, sharded by the learner group.

Quantities keep one name from the learner's stats to the metrics row to Prometheus: `entropy`
(exact, T=1, GRPO rows: the controller's default signal), `entropy_sampled`,
`entropy_sampled_batch`, `entropy_regularizer`, `entropy_target`, `reg_temperature`,
`reg_selected`, ... (services/loop/metrics.py maps each row field to its metric).

The backends implement the protocols: services/backends/ray_cluster.py (Ray actors) and
services/backends/in_process.py; tests use fakes. The controller's interface is
`controller.client.ControllerClient`. This module imports neither Ray nor torch, so the rollout
service and its engines load it in any process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from controller.client import ControllerClient

if TYPE_CHECKING:
    from reward_server.schemas import VerifyItem, VerifyResult
    from services.data.datasets import PromptItem
    from services.learner.batch import TrainBatch


@dataclass
class Sample:
    """One sampled response. `response_ids` ends with eos when finish_reason is 'stop'."""

    prompt: Any  # what the caller passed with the prompt ids: the driver's PromptItem
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "stop" | "length"
    temperature: float
    policy_version: int
    engine: str
    text: str = ""  # the decoded response (the driver, step 3)
    reward: float = 0.0  # the verdict (the driver, step 4)
    outcome: str = ""


class RolloutBackend(Protocol):
    """Rollout generation: the Ray pool or the in-process service, behind the driver's calls."""

    def generate(self, prompts: Sequence[tuple[PromptItem, list[int]]], n: int, temperature: float, seed: int) -> list[Sample]:
        """n samples per prompt, grouped prompt by prompt, in order."""

    def generate_step(
        self, step: int, prompts: Sequence[tuple[PromptItem, list[int]]], reg_prompts: Sequence[tuple[PromptItem, list[int]]],
        n: int, seed: int,
    ) -> tuple[list[Sample], list[Sample], dict]:
        """The GRPO batch at T=1 and, when reg_prompts is not empty, the regularizer batch at the
        temperature the rollout service gets from the controller's plan for `step`, in one engine
        call. Returns (grpo samples, regularizer samples, plan or {})."""

    def load_weights(self, version: int, weights: Any) -> float:
        """Push weights; returns seconds spent."""


class RewardBackend(Protocol):
    """The reward server (over HTTP) or the inline verifiers."""

    def verify(self, items: list[VerifyItem]) -> list[VerifyResult]:
        """One verdict per item, in order."""


class LearnerBackend(Protocol):
    """The learner group (Ray) or one in-process rank."""

    def update(self, batch: TrainBatch, step: int, levers: dict | None = None) -> dict:
        """One policy update; publishes the step's entropy to the controller; returns stats.
        `levers`: a rival controller's decision for the step, applied to the loss."""

    def full_weights(self) -> Any:
        """The full weights in the form the rollout backend's `load_weights` takes: a `BucketedWeights`
        (services/backends/weight_buckets.py; on Ray its buckets are ObjectRefs the driver never resolves)."""

    def state_dict(self) -> dict:
        """The full weights as tensors in this process (HF names): what an export writes."""

    def save(self, path: str) -> dict[str, int] | None:
        """Write the learners' state under `path`; returns {file: bytes} written (fsynced), for the
        checkpoint's manifest (None: not reported)."""

    def load(self, path: str) -> None: ...


class Tokenizer(Protocol):
    """Prompt text to ids, response ids to text (chat template applied by the backend)."""

    pad_id: int  # what the update batch pads with

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Components:
    """What one run's driver talks to."""

    rollout: RolloutBackend
    reward: RewardBackend
    learner: LearnerBackend
    controller: ControllerClient
    tokenizer: Tokenizer
    metrics: Any = None  # services.loop.metrics.RunMetrics or None
    model_path: str | None = None  # the starting checkpoint; None (tests' fakes): no policy export
    # replaces a failed role's actors (RoleFailure below); None: a failure ends the run
    recover: Callable[[str], None] | None = None


# ----------------------------------------------------------------------------- failures
# Every remote wait in the driver has a timeout and turns a dead or silent actor into a
# `RoleFailure` naming the role and what it was doing; services/loop/recovery.py says how the
# driver comes back from each (in place, or by a rollback to the latest checkpoint).

ROLES = ("rollout", "learner", "controller", "reward")


class RoleFailure(RuntimeError):
    """A role died, hung past its timeout, or answered something the driver cannot use."""

    def __init__(self, role: str, message: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        super().__init__(f"{role}: {message}")
        self.role = role

    def __reduce__(self):  # crosses Ray's process boundary intact
        return (type(self), (self.role, str(self).split(": ", 1)[1]))


class RoleTimeout(RoleFailure):
    """A remote call did not answer within its timeout."""


class ControllerStateLost(RoleFailure):
    """The controller restarted without its state (in-memory store) and must be handed it back;
    it refuses to plan from nothing rather than silently steering a blank integral."""

    def __init__(self, role: str = "controller", message: str = "restarted without its state") -> None:
        super().__init__(role, message)
