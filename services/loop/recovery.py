"""The driver's side of failing and coming back (`RoleFailure` in services/contracts.py says what fails).

Two ways back, cheapest first:
- **in place**: a controller that restarted without its state gets the driver's copy of it (taken
  after every step), then the step's plan and entropy again, exactly as it had them; the step
  goes on. (A rollout actor's restart never reaches here: the pool re-syncs it itself.)
- **rollback**: any other `RoleFailure` (a learner rank died, an actor is out of restarts, a
  role stopped answering) replaces that role's actors and rolls the run back to its newest
  intact checkpoint, or to its start when there is none yet. The steps since are run again
  with the same data, seeds and RNG states, so the logs end up as if nothing had happened.

Each recovery is logged to `events.jsonl` in the run's directory; `recovery.max_recoveries` per
role bounds them, so a deterministic fault stops the run instead of looping.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, TypeVar

from controller.client import publish_entropy
from services.contracts import ControllerStateLost, RoleFailure
from services.loop import checkpoint

if TYPE_CHECKING:
    from services.loop.trainer import Trainer

log = logging.getLogger("aepo")
T = TypeVar("T")


def record(trainer: "Trainer", event: dict) -> None:
    """One line of events.jsonl (recoveries, interrupts), durable."""
    trainer.event_log.append({"time": round(time.time(), 3), "step": trainer.step, **event})


def take_controller_copy(trainer: "Trainer") -> None:
    """The controller's state after the last complete step: what a restarted controller gets back."""
    def copy() -> None:
        trainer.controller_copy = trainer.parts.controller.state()

    with_controller(trainer, copy, planned=trainer.step_planned, stats=trainer.step_stats)


def with_controller(trainer: "Trainer", call: Callable[[], T], planned: bool, stats: dict | None) -> T:
    """`call()`, handing a restarted controller its state back (and this step's plan and entropy,
    when they had reached it) until it answers; more restarts than the budget is a failure."""
    for attempt in range(trainer.cfg.recovery.max_recoveries + 1):
        try:
            return call()
        except ControllerStateLost as exc:
            if trainer.controller_copy is None or attempt == trainer.cfg.recovery.max_recoveries:
                raise RoleFailure("controller", f"restarted without its state and could not be restored ({exc})") from exc
            restore_controller(trainer, planned, stats)
    raise AssertionError("unreachable")


def restore_controller(trainer: "Trainer", planned: bool, stats: dict | None) -> None:
    """Put the driver's copy back, then replay what the current step had told the controller."""
    controller = trainer.parts.controller
    controller.restore(trainer.controller_copy)
    if planned:
        controller.plan(trainer.step)  # same state, same step: the same plan (the PI integral is not counted twice)
    if stats is not None:
        publish_entropy(controller, trainer.step, stats)
    record(trainer, {"event": "controller_restored", "replayed_plan": planned, "replayed_entropy": stats is not None})
    log.warning("step %d: the entropy controller restarted without its state; restored it from the driver's copy",
                trainer.step)


def roll_back(trainer: "Trainer", failure: RoleFailure) -> None:
    """Replace the failed role and continue from the newest intact checkpoint (or the start)."""
    role = failure.role
    trainer.recoveries[role] = n = trainer.recoveries.get(role, 0) + 1
    budget = trainer.cfg.recovery.max_recoveries
    if trainer.parts.recover is None or n > budget:
        raise failure
    found = checkpoint.latest_intact(trainer.output_dir)
    # back to the start, the learners must be on the initial weights too: only new ones are
    roles = [role] + (["learner"] if found is None and role != "learner" else [])
    failed_at = trainer.step
    log.warning("step %d: %s; replacing the %s (recovery %d of %d) and rolling back to %s", failed_at, failure,
                " and ".join(roles), n, budget, found[0].name if found else "the start")
    try:
        for r in roles:
            trainer.parts.recover(r)
    except Exception as exc:
        raise failure from exc
    if found is not None:
        checkpoint.resume(trainer)
    else:
        checkpoint.restore(trainer, trainer.initial_state)
    trainer.step_planned, trainer.step_stats = False, None
    take_controller_copy(trainer)
    record(trainer, {"event": "rollback", "role": role, "failure": str(failure), "failed_at_step": failed_at,
                     "to_step": trainer.step, "recovery": n})


def counts(trainer: "Trainer") -> dict:
    """For the summary: rollbacks per failed role and controller restores over the run's whole
    history (events.jsonl spans resumes), rollout actors revived in place by this process."""
    events = trainer.event_log.rows()
    rollbacks = [e["role"] for e in events if e["event"] == "rollback"]
    return {"recoveries": {role: rollbacks.count(role) for role in sorted(set(rollbacks))},
            "controller_restores": sum(e["event"] == "controller_restored" for e in events),
            "rollout_restarts": getattr(getattr(trainer.parts.rollout, "pool", None), "restarts", 0)}
