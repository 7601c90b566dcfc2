"""Small helpers shared by the test suites (importable because tests/ is on pytest's sys.path)."""

from __future__ import annotations



def wait_for_http(url: str, proc, what: str, timeout_s: float = 60.0, interval_s: float = 0.2) -> None:
    """Poll `url` until it answers 2xx; fail the test if `proc` exits or the deadline passes."""
    import time
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start (exit code {proc.poll()})")
            time.sleep(interval_s)


def prompts_of(batch) -> list[list[int]]:
    """Each row's prompt ids, read back from a padded `TrainBatch`."""
    from services.learner.batch import prompt_lengths

    plen = prompt_lengths(batch.attention_mask, batch.response_mask).tolist()
    return [row[:n] for row, n in zip(batch.tokens.tolist(), plen)]


def responses_of(batch) -> list[list[int]]:
    """Each row's response ids, read back from a padded `TrainBatch`."""
    return [[t for t, m in zip(row, mask) if m] for row, mask in zip(batch.tokens.tolist(), batch.response_mask.tolist())]


def start_redis(port: int, workdir):
    """A real redis-server on 127.0.0.1:`port`, answering when this returns."""
    import shutil
    import socket
    import subprocess
    import time

    import pytest

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run `bash scripts/setup.sh --test` (it installs it with apt-get)")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
    return proc


class RayHead:
    """A `ray start --head --block` cluster on 127.0.0.1 in its own process group (see `start_ray_head`)."""

    def __init__(self, proc, temp: str, gcs_port: int, dashboard_port: int | None, env: dict, log_path: str):
        self.proc, self.temp, self.gcs_port, self.dashboard_port = proc, temp, gcs_port, dashboard_port
        self.env, self.log_path = env, log_path

    @property
    def address(self) -> str:
        """The GCS address a driver joins (RAY_ADDRESS)."""
        return f"127.0.0.1:{self.gcs_port}"

    def log(self, tail: int | None = None) -> str:
        """What `ray start` printed (the last `tail` characters)."""
        try:
            with open(self.log_path, errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        return text[-tail:] if tail else text

    def stop(self) -> None:
        """Kill this cluster's process group, then any process still naming its temp dir, and only
        those: `ray stop` would stop every Ray on the machine (the session's local Ray, other runs')."""
        import os
        import shutil
        import signal
        import subprocess

        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                pass
        for pid in _pids_naming(self.temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains `text` (a cluster's own temp dir)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def start_ray_head(num_cpus: int = 2, dashboard: bool = False, resources: dict | None = None,
                   timeout_s: float = 120.0) -> RayHead:
    """`ray start --head --block` on 127.0.0.1 with every port of its own (the session's local Ray
    holds the default ones) and a short temp dir of its own (unix socket paths stay under 107 bytes;
    `ray_current_cluster` is written there, not in /tmp/ray). Its processes get the environment of a
    local cluster of `aepo train` (loopback only, quiet) and this venv's `ray` and `python` on PATH.
    Returns once the head printed that it started (and, with `dashboard`, its HTTP API answers)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import pytest

    from services.backends.network import free_port, local_ray_env

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **local_ray_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs = free_port()
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    dash = free_port() if dashboard else None
    dash_args = ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"] if dashboard else ["--include-dashboard=false"]
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp}", *dash_args, *own_ports]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    log_path = os.path.join(temp, "head.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc, temp, gcs, dash, env, log_path)
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in head.log():
        if proc.poll() is not None or time.monotonic() > deadline:
            printed = head.log(3000)
            head.stop()
            pytest.fail(f"ray head did not start (exit code {proc.poll()}):\n{printed}")
        time.sleep(0.2)
    if dashboard:
        try:
            wait_for_http(f"http://127.0.0.1:{dash}/api/version", proc, "ray head's dashboard", timeout_s=timeout_s,
                          interval_s=0.5)
        except BaseException:
            head.stop()
            raise
    return head
