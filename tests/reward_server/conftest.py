"""Fixtures: TestClient apps, a real `aepo serve-reward` process, a real redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from services.backends.network import free_port
from reward_testlib import make_client

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def client():
    """The default app: 2 workers, 1.5 s per-item limit, no token, LRU cache."""
    c = make_client(workers=2, item_time_limit_s=1.5)
    yield c
    c.__exit__(None, None, None)


@pytest.fixture(scope="session")
def strict_client():
    """An app with a token and small limits: 5 items, 100-char responses, 4 KiB bodies."""
    c = make_client(workers=1, token="s3cret", max_items=5, max_response_chars=100, max_body_bytes=4096,
                    max_timeout_s=30)
    yield c
    c.__exit__(None, None, None)


# `redis_url` (a real redis-server on 127.0.0.1) comes from tests/conftest.py


def start_server_process(port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m services.cli serve-reward --port <port> ...` as a subprocess."""
    cmd = [sys.executable, "-m", "services.cli", "serve-reward", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def server_url():
    """A real `aepo serve-reward` process (2 workers, token 'tok'), ready; stopped after the session."""
    port = free_port()
    proc = start_server_process(port, "--workers", "2", env={"AEPO_REWARD_TOKEN": "tok",
                                                             "AEPO_REWARD_ITEM_TIME_LIMIT_S": "1.5"})
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url) as http:
            end = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"aepo serve-reward exited with {proc.returncode}")
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > end:
                    pytest.fail("aepo serve-reward not ready after 90 s")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
