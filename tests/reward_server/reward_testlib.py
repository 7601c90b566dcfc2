"""Helpers shared by the reward-server tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from reward_server.main import create_app
from reward_server.settings import RewardSettings


def wait_ready(client, timeout_s: float = 60.0) -> None:
    """Poll GET /readyz (TestClient or httpx.Client) until 200."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("reward server not ready")


def verify(client, items, timeout_s=None, **kw):
    """POST /v1/verify and return the results list (asserting 200)."""
    body = {"items": items}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    r = client.post("/v1/verify", json=body, **kw)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def item(i, task, response, reference):
    """An item dict."""
    return {"id": str(i), "task": task, "response": response, "reference": reference}


def start_client(**settings) -> TestClient:
    """An entered TestClient (lifespan started) of an app with these settings, ready or not."""
    client = TestClient(create_app(RewardSettings(**settings)))
    client.__enter__()
    return client


def make_client(**settings) -> TestClient:
    """An entered TestClient (lifespan started) of an app with these settings, once ready."""
    client = start_client(**settings)
    wait_ready(client)
    return client


def gate_item(i, gate_path):
    """An item of the `test-gate` plugin task: in flight until `gate_path` exists (reward_plugin_gate.py)."""
    return item(i, "test-gate", "x", str(gate_path))


def metric(client, name: str, labels: str = "") -> float:
    """One sample of GET /metrics (0 if absent), e.g. metric(c, "aepo_reward_rejected_total", 'reason="busy"')."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in client.get("/metrics").text.splitlines():
        if line.rsplit(" ", 1)[0] == key:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, what: str, timeout_s: float = 60.0, every_s: float = 0.05):
    """Poll until predicate() is truthy (returns it); AssertionError naming `what` after timeout_s (a hang guard)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


class ServerThread:
    """An app under a real uvicorn on 127.0.0.1 in a thread of this process (`with ServerThread(...) as url`)."""

    def __init__(self, **settings) -> None:
        import uvicorn

        from services.backends.network import free_port

        self.app = create_app(RewardSettings(**settings))
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        with httpx.Client(base_url=self.url) as http:
            wait_ready(http, timeout_s=90)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`python -m services.cli serve-reward --host 127.0.0.1 --port PORT ...` as a child process.

    `env` adds to this process's environment; tests/reward_server is on PYTHONPATH so the test
    plugins load (server and workers). `start()` returns once /readyz answers 200.
    """

    def __init__(self, port: int, *extra: str, env: dict | None = None) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "services.cli", "serve-reward", "--host", "127.0.0.1", "--port", str(port),
                    "--log-level", "warning", *extra]
        path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env)
        with httpx.Client(base_url=self.url) as http:
            wait_for(lambda: self.proc.poll() is not None or _answers_ready(http), "the server to be ready", 120)
        assert self.proc.poll() is None, f"serve-reward exited with {self.proc.returncode}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers_ready(http) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False
