"""Failing and coming back, in the driver: rollbacks, controller restores, damaged checkpoints,
the row written only into a checkpoint, the watchdog. Fakes around the real loop (test_trainer.py);
the same with real processes killed is tests/test_recovery.py."""

import json
import time

import pytest

from controller.actor import ControllerCore
from services.contracts import RoleFailure
from services.loop import checkpoint
from services.loop.outputs import comparable
from services.loop.watchdog import Watchdog
from test_trainer import build, make_cfg


def _rows(trainer):
    return [comparable(r) for r in trainer.log.rows()]


def untouched(tmp_path, cfg):
    trainer, _ = build(tmp_path / "untouched", cfg, entropies=(0.5, 0.2, 0.4))
    trainer.fit()
    return _rows(trainer)


class FailOnce:
    """The learner raises `failure` at its update of `step`, once (a rank died mid-update)."""

    def __init__(self, inner, step, failure):
        self.inner, self.step, self.failure, self.fired = inner, step, failure, 0

    def update(self, batch, step, levers=None):
        if step == self.step and self.fired < 1:
            self.fired += 1
            raise self.failure
        return self.inner.update(batch, step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("save_every", [2, 0])
def test_a_role_failure_rolls_back_to_the_checkpoint_or_the_start_and_ends_as_if_untouched(tmp_path, save_every):
    cfg = make_cfg(trainer={"steps": 5, "save_every": save_every})
    trainer, parts = build(tmp_path, cfg, entropies=(0.5, 0.2, 0.4))
    recovered = []

    def recover(role):  # new actors start from the initial weights
        recovered.append(role)
        if role == "learner":
            parts.learner.inner.version = 0

    parts.learner = FailOnce(parts.learner, 3, RoleFailure("learner", "rank 1 died"))
    parts.recover = recover
    summary = trainer.fit()
    assert _rows(trainer) == untouched(tmp_path, cfg)
    assert recovered == ["learner"] and summary["recoveries"] == {"learner": 1}
    (event,) = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert (event["event"], event["failed_at_step"], event["to_step"]) == ("rollback", 3, 2 if save_every else 0)


def test_a_role_failing_past_its_budget_stops_the_run(tmp_path):
    cfg = make_cfg(trainer={"steps": 5, "save_every": 2}, recovery={"max_recoveries": 2})
    trainer, parts = build(tmp_path, cfg)
    failing = FailOnce(parts.learner, 3, RoleFailure("learner", "rank 1 died"))
    failing.fired = -10  # fails every time
    parts.learner, parts.recover = failing, lambda role: None
    with pytest.raises(RoleFailure, match="rank 1 died"):
        trainer.fit()
    assert trainer.recoveries == {"learner": 3}


def test_without_a_recover_hook_a_role_failure_ends_the_run(tmp_path):
    cfg = make_cfg(trainer={"steps": 5, "save_every": 2})
    trainer, parts = build(tmp_path, cfg)
    parts.learner = FailOnce(parts.learner, 1, RoleFailure("learner", "gone"))
    with pytest.raises(RoleFailure, match="gone"):
        trainer.fit()


def test_a_controller_that_restarts_blank_is_restored_and_the_run_is_unchanged(tmp_path):
    cfg = make_cfg(trainer={"steps": 5})
    trainer, parts = build(tmp_path, cfg, entropies=(0.5, 0.2, 0.4))
    ctl, inner = parts.controller, parts.rollout.generate_step

    def generate_step(step, *args):  # the controller restarts (blank) just before step 2 asks for its plan
        if step == 2 and not getattr(ctl, "killed", False):
            ctl.killed = True
            ctl.core = ControllerCore(cfg.algorithm, cfg.controller, cfg.run_name, restarted=True)
        return inner(step, *args)

    parts.rollout.generate_step = generate_step
    summary = trainer.fit()
    assert _rows(trainer) == untouched(tmp_path, cfg)
    assert summary["controller_restores"] == 1


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path, caplog):
    cfg = make_cfg(trainer={"steps": 5, "save_every": 2})
    trainer, _ = build(tmp_path, cfg)
    trainer.fit()
    root = checkpoint.checkpoint_root(tmp_path / "run")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000004", "step_000005"]
    (root / "step_000005" / "learner" / "state.json").write_text("")  # a torn shard
    path, state = checkpoint.latest_intact(tmp_path / "run")
    assert path.name == "step_000004" and state["step"] == 4
    assert "step_000005 is damaged" in caplog.text and "state.json missing or not" in caplog.text
    (root / "step_000004" / "driver_state.json").write_text("{")
    assert checkpoint.latest_intact(tmp_path / "run") is None


def test_a_row_lost_between_checkpoint_and_log_comes_back_from_the_checkpoint(tmp_path):
    cfg = make_cfg(trainer={"steps": 4, "save_every": 2})
    first, _ = build(tmp_path, cfg, entropies=(0.5, 0.2, 0.4))
    first.fit()
    rows = first.log.rows()
    # killed after the checkpoint at step 4 was committed, before row 3 reached metrics.jsonl
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    longer = make_cfg(trainer={"steps": 6, "save_every": 2})
    second, _ = build(tmp_path, longer, entropies=(0.5, 0.2, 0.4))
    second.fit(resume=True)
    after = second.log.rows()
    assert [r["step"] for r in after] == [0, 1, 2, 3, 4, 5]
    assert comparable(after[3]) == comparable(rows[3])


def test_a_fresh_run_refuses_a_used_directory_unless_told_to_overwrite(tmp_path):
    from services.loop.outputs import RunDirNotEmpty

    cfg = make_cfg(trainer={"steps": 2})
    build(tmp_path, cfg)[0].fit()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirNotEmpty, match="already holds a run"):
        build(tmp_path, cfg)[0].fit()
    again, _ = build(tmp_path, cfg)
    again.fit(overwrite=True)
    assert [r["step"] for r in again.log.rows()] == [0, 1]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the run's own files go
    with pytest.raises(checkpoint.NoCheckpoint, match="nothing to resume"):
        build(tmp_path / "empty", cfg)[0].fit(resume=True)


def test_the_watchdog_names_the_role_a_step_waits_on():
    said = []
    dog = Watchdog(0.2, report=said.append)
    with dog.phase(7, "learner", "the policy update"):
        time.sleep(0.7)
    with dog.phase(8, "rollout", "generating"):
        pass
    dog.close()
    assert said and all(m.startswith("step 7: waiting on the learner (the policy update) for ") for m in said)


def test_samples_of_another_policy_version_are_refused():
    from services.contracts import Sample
    from services.rollout.pool import RolloutPool

    pool = RolloutPool.__new__(RolloutPool)
    pool.version = 3
    ok = Sample(None, [1], [2], "stop", 1.0, 3, "hf")
    pool._check_versions([[ok]])
    with pytest.raises(RoleFailure, match=r"rollout: samples drawn with policy version\(s\) \[0\], the driver's is 3"):
        pool._check_versions([[ok, Sample(None, [1], [2], "stop", 1.0, 0, "hf")]])
