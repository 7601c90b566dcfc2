"""`aepo train --compare grpo`: the main run and its GRPO baseline side by side in one local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


def test_compare_runs_both_at_once_and_prints_both_trajectories(tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "run_name: cmp\n"
        "algorithm: {type: aepo, prompt_share: 1.0, rule: {type: bang_bang, m_up: 8, m_down: 4}}\n"
        "data: {type: countdown, num_train: 50, num_eval: 4}\n"
        "rollout: {engine: hf, group_size: 2, max_tokens: 8}\n"
        "learner: {num_workers: 2, cpus_per_worker: 0.5, micro_batch_size: 8}\n"
        "reward: {mode: serve}\n"
        f"trainer: {{steps: 2, prompts_per_step: 2, eval_every: 0, save_every: 0, eval_samples: 2, output_dir: {out}}}\n"
        "warm_start: {steps: 0}\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.train", "--config", str(cfg), "--compare", "grpo", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    main = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    base = [json.loads(x) for x in (out / "compare-grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["algorithm"] for r in main] == ["aepo", "aepo"] and [r["algorithm"] for r in base] == ["grpo", "grpo"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compare"]["grpo"]["steps"] == 2
    # what the learners computed in, as they resolved it (the config leaves cpu_compute at float32)
    assert summary["learner_compute"] == {"device": "cpu", "layers": "float32", "params": "float32"}
    assert "aepo H" in proc.stdout and "grpo H" in proc.stdout  # the trajectory table, one column per run
    assert "running the baseline after the main run" not in proc.stdout  # they ran side by side


class _FakePool:
    def __init__(self):
        self.threads = []

    def set_threads(self, n):
        self.threads.append(n)
        return [n]


class _FakeSystem:
    def __init__(self):
        self.pool = _FakePool()


def test_the_run_left_alone_gets_the_generation_threads_back():
    """The first run to end hands its cores over: the other's rollout actors get rollout.torch_threads."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from services.cli.train import hand_over_threads

    release = threading.Event()
    main_sys, sib_sys = _FakeSystem(), _FakeSystem()
    with ThreadPoolExecutor(2) as pool:
        main_run = pool.submit(lambda: "main done")  # ends first
        base_run = pool.submit(lambda: release.wait(10) and "base done")
        hand_over_threads({main_run: sib_sys, base_run: main_sys}, 2)
        assert sib_sys.pool.threads == [2] and main_sys.pool.threads == []  # the baseline, still running, got them
        release.set()
        assert base_run.result() == "base done"
    # one thread configured: nothing to hand over; a failed run hands nothing over either
    other, hold = _FakeSystem(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        failed = pool.submit(lambda: 1 / 0)
        slow = pool.submit(lambda: hold.wait(10))
        hand_over_threads({failed: other, slow: _FakeSystem()}, 2)
        hand_over_threads({failed: other, slow: _FakeSystem()}, 1)
        hold.set()
    assert other.pool.threads == []

