"""`aepo train` killed at an arbitrary step and resumed ends with the same files as a run left alone.

The driver process is killed for real, with the whole process group (the Ray cluster it started,
the reward server, the actors: what a lost node or a killed container takes with it), once a few
metrics rows exist, at whatever point of a step it happens to be. `--resume` then continues from
the newest checkpoint. metrics.jsonl (every field but the timings), eval.jsonl and samples.jsonl
must equal those of the uninterrupted run, bit for bit: every RNG that matters is checkpointed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
STEPS = 7


def _config(tmp_path: Path, rule: str) -> Path:
    rules = {"bang_bang": "{type: bang_bang, m_up: 8, m_down: 4}",
             "pi": "{type: pi, kp: 2.0, ki: 0.5, u_max: 1.0}"}
    cfg = tmp_path / f"{rule}.yaml"
    cfg.write_text(
        f"run_name: resume-{rule}\n"
        f"algorithm: {{type: aepo, prompt_share: 1.0, target: {{type: constant, value: 0.5}}, rule: {rules[rule]}}}\n"
        "data: {type: countdown, num_train: 60, num_eval: 4}\n"
        "rollout: {engine: hf, group_size: 4, max_tokens: 12}\n"
        "learner: {num_workers: 2, cpus_per_worker: 0.5, micro_batch_size: 8}\n"
        "reward: {mode: serve}\n"
        f"trainer: {{steps: {STEPS}, prompts_per_step: 4, eval_every: 3, save_every: 2, eval_samples: 2, log_samples: 2}}\n"
        "warm_start: {steps: 0}\n"
    )
    return cfg


def _env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _train(cfg: Path, out: Path, *flags: str, backend: str = "ray", kill_after_rows: int | None = None,
           sig: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "services.cli.train", "--config", str(cfg), "--output-dir", str(out),
           "--no-progress", "--backend", backend, *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if kill_after_rows is not None:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 600
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_rows):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.05)
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        else:
            os.kill(proc.pid, sig)  # a polite stop, to the driver only
    stdout, _ = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")


def _files(out: Path) -> dict:
    from services.loop.outputs import comparable

    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    return {"metrics": [comparable(r) for r in read("metrics.jsonl")], "eval": read("eval.jsonl"),
            "samples": read("samples.jsonl")}


@pytest.fixture(scope="module")
def untouched(tmp_path_factory):
    """One uninterrupted run per (backend, rule), made on first use."""
    made: dict = {}

    def get(backend: str, rule: str) -> dict:
        if (backend, rule) not in made:
            tmp = tmp_path_factory.mktemp(f"untouched-{backend}-{rule}")
            done = _train(_config(tmp, rule), tmp / "run", backend=backend)
            assert done.returncode == 0, done.stdout[-3000:]
            made[backend, rule] = _files(tmp / "run")
            assert [r["step"] for r in made[backend, rule]["metrics"]] == list(range(STEPS))
        return made[backend, rule]

    return get


@pytest.mark.parametrize(("backend", "rule", "kill_after"), [("ray", "bang_bang", 4), ("local", "pi", 3)])
def test_a_driver_killed_mid_run_resumes_to_the_same_files(untouched, tmp_path, backend, rule, kill_after):
    cfg, out = _config(tmp_path, rule), tmp_path / "run"
    killed = _train(cfg, out, backend=backend, kill_after_rows=kill_after)
    assert killed.returncode == -signal.SIGKILL
    resumed = _train(cfg, out, "--resume", backend=backend)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _files(out) == untouched(backend, rule)
    assert json.loads((out / "summary.json").read_text())["resumed"] is True


def test_sigterm_checkpoints_exits_and_the_resumed_run_matches(untouched, tmp_path):
    cfg, out = _config(tmp_path, "pi"), tmp_path / "run"
    stopped = _train(cfg, out, backend="local", kill_after_rows=1, sig=signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert "continue with --resume" in stopped.stdout
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "interrupted" and events[-1]["checkpoint"] == f"step_{events[-1]['step']:06d}"
    assert events[-1]["step"] < STEPS
    resumed = _train(cfg, out, "--resume", backend="local")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _files(out) == untouched("local", "pi")


def test_resume_with_nothing_to_resume_and_a_fresh_run_over_an_old_one_are_refused(tmp_path):
    cfg, out = _config(tmp_path, "pi"), tmp_path / "run"
    nothing = _train(cfg, out, "--resume", backend="local")
    assert nothing.returncode == 2 and f"nothing to resume in {out}" in nothing.stdout
    assert not (out / "metrics.jsonl").exists()
    out.mkdir(exist_ok=True)
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    refused = _train(cfg, out, backend="local")
    assert refused.returncode == 2 and "already holds a run (metrics.jsonl)" in refused.stdout
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n'  # untouched
    both = _train(cfg, out, "--resume", "--overwrite", backend="local")
    assert both.returncode == 2 and "contradict" in both.stdout


def test_a_fresh_run_under_the_same_name_starts_its_own_redis_state(tmp_path, redis_url):
    """The controller's Redis state is keyed by a run id each fresh run renews: a second fresh run
    with the same run_name (here --overwrite into the same directory) neither loads the first
    run's entropy log nor trips over it (it used to fail at its first observation)."""
    import redis

    cfg, out = _config(tmp_path, "bang_bang"), tmp_path / "run"
    cfg.write_text(cfg.read_text() + f"controller: {{redis_url: '{redis_url}'}}\n")
    first = _train(cfg, out, backend="local")
    assert first.returncode == 0, first.stdout[-3000:]
    second = _train(cfg, out, "--overwrite", backend="local")
    assert second.returncode == 0, second.stdout[-3000:]
    keys = sorted(k.decode() for k in redis.Redis.from_url(redis_url).keys("aepo:controller:resume-bang_bang-*"))
    assert len(keys) == 2  # one state per run
    resumed_id = json.loads(next((out / "checkpoints").glob("step_*/driver_state.json")).read_text())["controller"]["run_id"]
    assert f"aepo:controller:{resumed_id}" in keys
