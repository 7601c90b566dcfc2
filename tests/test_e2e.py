"""End to end on CPU through every real component: Ray, the reward server on Ray Serve over HTTP,
a rollout actor, 2 FSDP learner actors, the entropy controller, the driver's Prometheus exporter.

The model is the embedded tiny Qwen2, taught in-process to answer four Countdown problems (so
the regularizer batch has real positives, verified by the real `countdown` verifier); the run
then trains on exactly those problems.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from services.backends.network import free_port
from testlib import prompts_of

pytestmark = pytest.mark.slow



def _config(tmp_path: Path, port: int, steps: int):
    from services.config import TrainConfig

    return TrainConfig.model_validate({
        "run_name": "e2e",
        "algorithm": {
            "type": "aepo",
            # steps 0-1: H* = 5 (above any entropy here) -> up; from step 2: H* = 0.01 -> down
            "target": {"type": "piecewise", "boundaries": [2], "values": [5.0, 0.01]},
            "rule": {"m_up": 8, "m_down": 4},
            "prompt_share": 1.0,
        },
        "data": {"type": "countdown", "num_train": 4, "num_eval": 1, "seed": 0},
        "rollout": {"engine": "hf", "group_size": 4, "max_tokens": 24, "cpus_per_actor": 0.5},
        "learner": {"num_workers": 2, "cpus_per_worker": 0.5, "micro_batch_size": 16, "lr": 1e-4},
        "reward": {"mode": "serve"},
        "controller": {"name": "e2e-controller"},
        "trainer": {"steps": steps, "prompts_per_step": 4, "eval_every": 0, "save_every": 2, "eval_samples": 2,
                    "output_dir": str(tmp_path / "run"), "metrics_port": port, "log_samples": 2},
    })


class CrashAt:
    """Wraps the real learner adapter; dies at one step, as a killed learner would."""

    def __init__(self, inner, step):
        self.inner, self.crash_step = inner, step
        self.seen_prompts = {}

    def update(self, batch, step, levers=None):
        if step == self.crash_step:
            raise RuntimeError("learner killed")
        self.seen_prompts[step] = prompts_of(batch)
        return self.inner.update(batch, step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_short_aepo_run_through_every_real_component(ray_local, taught_model, tmp_path):
    from services.data.datasets import load_items
    from services.loop.trainer import Trainer
    from services.loop.metrics import RunMetrics
    from services.backends.ray_cluster import System

    model_path, _ = taught_model
    port = free_port()
    cfg = _config(tmp_path, port, steps=5)
    train_items, eval_items = load_items(cfg.data)
    with System(cfg, model_path) as system:
        assert system.reward_url.startswith("http://127.0.0.1:")
        # --- a first run, killed at step 3 (after the checkpoint at 2)
        metrics = RunMetrics(cfg.run_name, port)
        parts = system.components(metrics)
        crashing = CrashAt(parts.learner, 3)
        parts.learner = crashing
        first = Trainer(cfg, parts, train_items, eval_items, tmp_path / "run", progress=False)
        with pytest.raises(RuntimeError, match="learner killed"):
            first.fit()
        # the Prometheus endpoint carries the entropy series of the last finished step
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2]
        last = rows[-1]
        assert f'aepo_policy_entropy{{run_id="e2e",source="exact"}} {last["entropy"]}' in body
        assert f'aepo_regularizer_temperature{{run_id="e2e"}} {last["reg_temperature"]}' in body
        # where the entropy lives: both split into irrelevant + content = the mean, in the file and the scrape
        te = last["token_entropy"]
        assert te["irrelevant"] + te["content"] == pytest.approx(last["entropy"], rel=1e-6)
        assert f'aepo_token_entropy{{kind="content",run_id="e2e"}} {te["content"]}' in body
        assert f'aepo_token_entropy_share{{kind="forking",run_id="e2e"}} {last["entropy_forking_share"]}' in body
        assert 'aepo_token_entropy_by_position{position="0",run_id="e2e"}' in body
        metrics.close()

        # the controller read the learners' entropy and flipped when the target fell below it
        assert [r["reg_temperature"] for r in rows] == [1.2, 1.2, 0.8]
        assert rows[1]["entropy"] < 5.0 and rows[2]["entropy"] > 0.01
        state = system.controller.state()
        assert state["last"]["exact"]["step"] == 2 and state["last"]["exact"]["entropy"] == pytest.approx(rows[2]["entropy"])
        # every regularizer sample trained on was drawn at T_reg and verified correct over HTTP
        samples = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
        reg = [s for s in samples if s["kind"] == "regularizer"]
        assert reg, "the taught model should produce correct regularizer samples"
        for s in reg:
            assert s["reward"] == 1.0 and s["outcome"] == "correct" and s["advantage"] == 1.0
            assert s["temperature"] == rows[s["step"]]["reg_temperature"]
        assert sum(r["reg_selected"] for r in rows) == len(reg)

        # --- a fresh policy side (new learners, engine, and an in-memory controller that knows nothing)
        from services.loop import checkpoint

        system.restart_policy_side(cfg, run_id=checkpoint.saved_run_id(tmp_path / "run"))  # as `--resume` does
        assert system.controller.state()["last"] == {}
        parts2 = system.components(None)
        recorder = CrashAt(parts2.learner, -1)
        parts2.learner = recorder
        second = Trainer(cfg, parts2, train_items, eval_items, tmp_path / "run", progress=False)
        second.fit(resume=True)
        rows2 = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows2] == [0, 1, 2, 3, 4]
        assert min(recorder.seen_prompts) == 2  # resumed at the checkpoint taken after 2 steps
        # same data position: step 2's prompts are the ones the killed run trained on at step 2
        assert sorted(map(tuple, recorder.seen_prompts[2])) == sorted(map(tuple, crashing.seen_prompts[2]))
        # same controller state: step 2 made the same decision (down) with the restored observation
        assert rows2[2]["reg_temperature"] == rows[2]["reg_temperature"] == 0.8
        assert rows2[-1]["policy_version"] == 5
        # the trained policy, exported as a checkpoint directory of the final weights
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["policy_dir"] == str(tmp_path / "run" / "policy")
        assert json.loads((tmp_path / "run" / "policy" / "aepo_export.json").read_text())["policy_version"] == 5
