"""The step's types and the components' interfaces, as the driver sees them.

A sample's life in one step: the engine's `EngineOutput` (services/rollout/engines) becomes a
`Sample` in the rollout service (token ids, temperature, policy version), a `Rollout` in the
driver (joined with its prompt, decoded, then given its reward and outcome), a row of the update
batch (`services/loop/steps.update_batch`, the learners' `TrainBatch`), and a line of
samples.jsonl. Quantities keep one name from the learner's stats to the metrics row to
Prometheus: `entropy` (exact, T=1, GRPO rows: the controller's default signal), `entropy_sampled`,
`entropy_sampled_batch`, `entropy_regularizer`, `entropy_target`, `reg_temperature`, ...
(services/loop/metrics.py maps each row field to its metric).

The backends implement the protocols: services/backends/ray_cluster.py (Ray actors) and
services/backends/in_process.py; tests use fakes. The controller's interface is
`controller.client.ControllerClient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from controller.client import ControllerClient
from services.data.datasets import PromptItem


@dataclass
class Rollout:
    """One sampled response, joined with its verdict after step 4."""

    prompt: PromptItem
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str
    temperature: float
    policy_version: int
    engine: str
    text: str = ""
    reward: float = 0.0
    outcome: str = ""


class RolloutBackend(Protocol):
    """Rollout generation: the Ray pool or the in-process service, behind the driver's calls."""

    def generate(self, prompts: Sequence[tuple[PromptItem, list[int]]], n: int, temperature: float, seed: int) -> list[Rollout]:
        """n samples per prompt, grouped prompt by prompt, in order."""

    def generate_step(
        self, step: int, prompts: Sequence[tuple[PromptItem, list[int]]], reg_prompts: Sequence[tuple[PromptItem, list[int]]],
        n: int, seed: int,
    ) -> tuple[list[Rollout], list[Rollout], dict]:
        """The GRPO batch at T=1 and, when reg_prompts is not empty, the regularizer batch at the
        temperature the rollout service gets from the controller's plan for `step`, in one engine
        call. Returns (grpo samples, regularizer samples, plan or {})."""

    def load_weights(self, version: int, weights: Any) -> float:
        """Push weights; returns seconds spent."""


class RewardBackend(Protocol):
    """The reward server (over HTTP) or the inline verifiers."""

    def verify(self, items: list[dict]) -> list[dict]:
        """[{id, task, response, reference}] -> [{id, reward, outcome, detail}] in order."""


class LearnerBackend(Protocol):
    """The learner group (Ray) or one in-process rank."""

    def update(self, batch: dict, step: int) -> dict:
        """One policy update; publishes the step's entropy to the controller; returns stats."""

    def full_weights(self) -> dict: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...


class Tokenizer(Protocol):
    """Prompt text to ids, response ids to text (chat template applied by the backend)."""

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
