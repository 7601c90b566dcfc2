"""A scrape of each exporter passes `promtool check metrics` (Prometheus naming conventions)."""

from __future__ import annotations

import subprocess

from _deploy_helpers import promtool
from prometheus_client import generate_latest

from services.loop.metrics import RunMetrics

ROW = {
    "step": 3, "policy_version": 4, "entropy": 0.4, "entropy_sampled": 0.41, "entropy_target": 0.35,
    "reg_temperature": 0.8, "reg_m": 32, "reg_selected": 12, "reg_direction": "down", "reward_mean_grpo": 0.5,
    "accuracy_grpo": 0.5, "reward_mean_regularizer": 0.3, "accuracy_regularizer": 0.3, "step_seconds": 2.0,
    "rollout_tokens_per_s": 6000.0, "learner_tokens_per_s": 7000.0, "weight_sync_seconds": 0.02,
    "time": {"rollout": 1.0}, "reward_failures": {"timeout": 1}, "eval_avg@8": 0.4, "eval_pass@8": 0.7,
    "token_entropy": {"irrelevant": 0.2}, "entropy_source": "forking", "entropy_controlled": 0.9,
}


def _lint(text: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, timeout=60)


def test_the_driver_exporter_scrape_passes_promtool():
    m = RunMetrics("lint")
    m.record_step(ROW)
    proc = _lint(generate_latest(m.registry))
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_the_reward_server_scrape_passes_promtool():
    from fastapi.testclient import TestClient

    from reward_server.main import create_app
    from reward_server.settings import RewardSettings

    with TestClient(create_app(RewardSettings(workers=1))) as client:
        items = [{"id": "1", "task": "exact", "response": "a", "reference": "a"},
                 {"id": "2", "task": "math", "response": "\\boxed{1}", "reference": "1"}]
        assert client.post("/v1/verify", json={"items": items}).status_code == 200
        scrape = client.get("/metrics").content
    proc = _lint(scrape)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_promtool_check_metrics_can_fail():
    proc = _lint(b"# HELP badName a counter without _total\n# TYPE badName counter\nbadName 1\n")
    assert proc.returncode != 0
