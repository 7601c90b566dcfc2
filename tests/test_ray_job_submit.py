"""`ray job submit` of the driver entrypoint against a real local head (ray start on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from services.backends.network import free_port
from testlib import wait_for_http

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent



@pytest.fixture()
def ray_head():
    """`ray start --head --block` in its own process group; killing the group stops only this cluster
    (`ray stop` would also stop the test session's own local Ray)."""
    # the job's `python` is the one on the head's PATH: this venv's
    from services.backends.network import local_ray_env

    # the head's processes stay on loopback and quiet, as a local cluster of `aepo train` does
    env = {**os.environ, **local_ray_env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # every port of its own: the session's local Ray (tests/conftest.py) holds the default ones
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # unix socket paths must stay under 107 bytes
    start = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
        f"--temp-dir={temp}", *own_ports,
    ]
    proc = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_http(f"{address}/api/version", proc, "ray head", timeout_s=120, interval_s=0.5)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


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
