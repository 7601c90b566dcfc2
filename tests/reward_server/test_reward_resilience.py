"""Real `aepo serve-reward` processes: drain on SIGTERM, a client that outlasts a restart, no public bind without a token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from reward_server.auth import is_loopback, token_required_problem
from reward_server.client import RewardClient
from reward_server.settings import RewardSettings
from reward_testlib import REPO, ServerProcess, gate_item, item, wait_for
from services.backends.network import free_port

TOKEN = "resilience-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GATED = {"AEPO_REWARD_TOKEN": TOKEN, "AEPO_REWARD_PLUGINS": json.dumps(["reward_plugin_gate"]),
         "AEPO_REWARD_ITEM_TIME_LIMIT_S": "60"}


def _status(url: str) -> dict:
    try:
        return httpx.get(url + "/readyz", timeout=5).json()
    except httpx.HTTPError:
        return {}


def _hold(url: str, gate, out: dict) -> threading.Thread:
    """A request of one gate item, in flight until `gate` exists; its response (or error) lands in out."""
    def run():
        try:
            out["r"] = httpx.post(url + "/v1/verify", json={"items": [gate_item("g", gate)], "timeout_s": 60},
                                  headers=AUTH, timeout=120)
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: _status(url).get("inflight", {}).get("requests") == 1, "the gate request to be in flight")
    return thread


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    gate, out = tmp_path / "open", {}
    with ServerProcess(free_port(), "--workers", "1", env={**GATED, "AEPO_REWARD_DRAIN_TIMEOUT_S": "120"}) as server:
        held = _hold(server.url, gate, out)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _status(server.url).get("status") == "draining", "the server to drain")
        r = httpx.post(server.url + "/v1/verify", json={"items": [item(1, "exact", "a", "a")]}, headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["reason"] == "draining", r.text
        assert server.proc.poll() is None  # still waiting for the gate request
        gate.touch()
        held.join(timeout=120)
        assert out["r"].status_code == 200 and out["r"].json()["results"][0]["outcome"] == "correct"
        assert server.proc.wait(timeout=60) == 0


def test_drain_gives_up_after_its_timeout_and_still_exits_0(tmp_path):
    out = {}
    with ServerProcess(free_port(), "--workers", "1", env={**GATED, "AEPO_REWARD_DRAIN_TIMEOUT_S": "1"}) as server:
        held = _hold(server.url, tmp_path / "never", out)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        held.join(timeout=120)
        assert "error" in out or out["r"].status_code >= 500  # cut off, not answered with a made-up verdict


def test_the_client_outlasts_a_server_restart_on_the_same_port():
    port = free_port()
    env = {"AEPO_REWARD_TOKEN": TOKEN}
    items = [item("a", "math", "\\boxed{\\frac{21}{6}}", "7/2"), item("b", "countdown", "9*8=72,72-3=69",
             {"numbers": [9, 8, 3], "target": 69, "use_all": True})]
    first = ServerProcess(port, "--workers", "1", env=env).start()
    client = RewardClient(first.url, token=TOKEN, timeout_s=300, retry_initial_s=0.05, retry_max_s=0.5)
    assert [r.outcome for r in client.verify_sync(items)] == ["correct", "correct"]
    first.proc.kill()  # a crash, not a drain: connections are refused until the replacement is up
    first.proc.wait(timeout=30)
    got: dict = {}
    thread = threading.Thread(target=lambda: got.update(r=client.verify_sync(items)))
    thread.start()
    second = ServerProcess(port, "--workers", "1", env=env)
    try:
        wait_for(lambda: client.retries["ConnectError"] >= 2, "the client to retry a refused connection")
        second.start()
        thread.join(timeout=300)
        assert [r.outcome for r in got["r"]] == ["correct", "correct"]
    finally:
        second.stop()


def test_serve_reward_refuses_a_public_address_without_a_token():
    # 192.0.2.1 (TEST-NET-1) is on no interface: even a broken check could not open a public socket.
    env = {k: v for k, v in os.environ.items() if k != "AEPO_REWARD_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "services.cli", "serve-reward", "--host", "192.0.2.1", "--port",
                           str(free_port())], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve on 192.0.2.1 without a bearer token" in proc.stderr and "AEPO_REWARD_TOKEN" in proc.stderr


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("10.1.2.3", False), ("reward-server", False)])
def test_which_binds_need_a_token(host, loopback):
    assert is_loopback(host) is loopback
    assert (token_required_problem(host, None) is None) is loopback
    assert token_required_problem(host, RewardSettings(token="t" * 32).token) is None


def test_a_blank_token_is_no_token():
    assert RewardSettings(token="").token is None and RewardSettings(token="  ").token is None
    assert RewardSettings(token="x").token.get_secret_value() == "x"
