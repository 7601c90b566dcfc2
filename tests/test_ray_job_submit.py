"""`ray job submit` of the driver entrypoint against a real local head (ray start on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testlib import start_ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent



@pytest.fixture()
def ray_head():
    """A head with its dashboard (the job API) in its own process group; stopping it stops only this
    cluster (`ray stop` would also stop the test session's own local Ray). The job's `python` is the
    one on the head's PATH: this venv's."""
    head = start_ray_head(num_cpus=2, dashboard=True)
    try:
        yield f"http://127.0.0.1:{head.dashboard_port}", head.env
    finally:
        head.stop()


def test_the_driver_runs_as_a_ray_job_on_a_local_head(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "job-run"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "run_name: job\n"
        "algorithm: {type: grpo}\n"
        "data: {type: countdown, num_train: 50, num_eval: 4}\n"
        "rollout: {engine: hf, group_size: 2, max_tokens: 8, cpus_per_actor: 0.5}\n"
        "learner: {num_workers: 2, cpus_per_worker: 0.5, micro_batch_size: 8}\n"
        "reward: {mode: serve}\n"
        f"trainer: {{steps: 2, prompts_per_step: 2, eval_every: 0, save_every: 0, eval_samples: 2, output_dir: {out}}}\n"
        "warm_start: {steps: 0}\n"
    )
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--", "python", "-m", "services.cli.train", "--config", str(cfg), "--no-progress",
    ]
    t0 = time.monotonic()
    for _ in range(30):  # the head's job agent comes up a little after its dashboard
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in proc.stderr + proc.stdout:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout.lower() or "SUCCEEDED" in proc.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[-1]["algorithm"] == "grpo"
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert time.monotonic() - t0 < 600
