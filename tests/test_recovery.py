"""Kill each role mid-run, for real (SIGKILL to its process), and check the run finishes with
every step exactly once and the same metrics as a run nobody touched.

One Ray cluster, one reward server on Serve, and per run a fresh policy side (2 FSDP learner
ranks, a rollout actor, the controller), on the taught tiny model of conftest.py. The kill lands
at step 3 of 5, after the checkpoint at step 2:
- rollout actor: Ray restarts it, the pool re-syncs it to the current policy version and draws
  its share again with the same seed (nothing rolled back);
- learner rank: the group is replaced and the run rolls back to the checkpoint at step 2;
- controller (in-memory state): it comes back blank, refuses to plan, the driver restores it;
- reward replica: Serve restarts it, the client retries until it answers.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

pytestmark = pytest.mark.slow

KILL_STEP = 3


def _config(tmp_path):
    from services.config import TrainConfig

    return TrainConfig.model_validate({
        "run_name": "kill",
        "algorithm": {"type": "aepo", "target": {"type": "constant", "value": 0.3}, "rule": {"m_up": 8, "m_down": 4},
                      "prompt_share": 1.0},
        "data": {"type": "countdown", "num_train": 4, "num_eval": 1, "seed": 0},
        "rollout": {"engine": "hf", "group_size": 4, "max_tokens": 24, "cpus_per_actor": 0.5},
        "learner": {"num_workers": 2, "cpus_per_worker": 0.5, "micro_batch_size": 16, "lr": 1e-4},
        "reward": {"mode": "serve"},
        "controller": {"name": "kill-controller"},
        "trainer": {"steps": 5, "prompts_per_step": 4, "eval_every": 0, "save_every": 2, "eval_samples": 2,
                    "output_dir": str(tmp_path), "log_samples": 0, "export_policy": False},
        "recovery": {"rollout_timeout_s": 300, "learner_timeout_s": 300, "sync_timeout_s": 120},
    })


class KillBefore:
    """Wraps a component; runs `kill()` once, just before `method` is called at `step`."""

    def __init__(self, inner, method: str, step_of, kill):
        self.inner, self.method, self.step_of, self.kill = inner, method, step_of, kill
        self.done = False

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def call(*args, **kwargs):
            if not self.done and self.step_of(*args) == KILL_STEP:
                self.done = True
                self.kill()
            return attr(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def cluster(ray_local, taught_model, tmp_path_factory):
    """The system, and the rows of a run nobody touched."""
    from services.backends.ray_cluster import System

    cfg = _config(tmp_path_factory.mktemp("baseline"))
    with System(cfg, taught_model[0]) as system:
        rows, evals, _ = _run(system, cfg, cfg.trainer.output_dir)
        yield system, rows, evals


def _run(system, cfg, out, wrap=None):
    from services.data.datasets import load_items
    from services.loop.trainer import Trainer

    system.restart_policy_side(cfg)
    parts = system.components(None)
    if wrap is not None:
        wrap(parts, system)
    train_items, eval_items = load_items(cfg.data)
    summary = Trainer(cfg, parts, train_items, eval_items, out, progress=False).fit()
    read = lambda name: [json.loads(line) for line in open(os.path.join(out, name))]  # noqa: E731
    return read("metrics.jsonl"), read("eval.jsonl"), summary


def _same_as_untouched(cluster, rows, evals):
    from services.loop.outputs import comparable

    _, base_rows, base_evals = cluster
    assert [r["step"] for r in rows] == list(range(5)), "every step exactly once"
    assert [comparable(r) for r in rows] == [comparable(r) for r in base_rows]
    assert evals == base_evals


def _sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def test_a_killed_rollout_actor_is_restarted_resynced_and_its_share_drawn_again(cluster, tmp_path):
    system = cluster[0]

    def wrap(parts, system):
        parts.rollout = KillBefore(parts.rollout, "generate_step", lambda step, *a: step,
                                   lambda: _sigkill(system.pool.pids()[0]))

    rows, evals, summary = _run(system, _config(tmp_path), str(tmp_path), wrap)
    _same_as_untouched(cluster, rows, evals)
    assert summary["rollout_restarts"] == 1 and summary["recoveries"] == {}


def test_a_killed_learner_rank_is_replaced_and_the_run_rolls_back_to_its_checkpoint(cluster, tmp_path):
    system = cluster[0]

    def wrap(parts, system):
        parts.learner = KillBefore(parts.learner, "update", lambda batch, step: step,
                                   lambda: _sigkill(system.learners.pids()[1]))

    rows, evals, summary = _run(system, _config(tmp_path), str(tmp_path), wrap)
    _same_as_untouched(cluster, rows, evals)
    assert summary["recoveries"] == {"learner": 1}
    events = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    assert [(e["event"], e["failed_at_step"], e["to_step"]) for e in events] == [("rollback", KILL_STEP, 2)]


def test_a_killed_controller_comes_back_blank_refuses_and_is_restored_by_the_driver(cluster, tmp_path):
    import ray

    system = cluster[0]

    def wrap(parts, system):
        parts.rollout = KillBefore(parts.rollout, "generate_step", lambda step, *a: step,
                                   lambda: _sigkill(ray.get(system.controller_handle.pid.remote())))

    rows, evals, summary = _run(system, _config(tmp_path), str(tmp_path), wrap)
    _same_as_untouched(cluster, rows, evals)
    assert summary["controller_restores"] == 1 and summary["recoveries"] == {}


def test_a_killed_reward_replica_is_outlasted_by_the_client(cluster, tmp_path):
    import ray

    system = cluster[0]

    def kill_replica():  # Serve's replicas are named actors; a forced kill is a crash to Serve
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "REPLICA" in a["name"].upper() and "aepo-reward" in a["name"]]
        assert replicas, f"no reward replica among {ray.util.list_named_actors(all_namespaces=True)}"
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    def wrap(parts, system):
        parts.reward = KillBefore(parts.reward, "verify", lambda items: int(items[0].id.split("-")[0]), kill_replica)

    rows, evals, summary = _run(system, _config(tmp_path), str(tmp_path), wrap)
    _same_as_untouched(cluster, rows, evals)
    assert summary["recoveries"] == {}
