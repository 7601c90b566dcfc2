"""The project's local Ray stays on 127.0.0.1 and sends nothing off the machine.

The end-to-end test starts a cluster exactly as `aepo train` does (in a fresh process, so that
nothing this session started is involved), makes an actor call, a gloo all-reduce and a request to
the reward server on Ray Serve, and reads every socket of every process in that cluster from /proc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.backends import network
from services.backends.network import SocketRecord

ROOT = Path(__file__).resolve().parents[3]


def rec(local, remote="0.0.0.0", state="ESTAB", process="raylet --node", pid=10, local_port=1, remote_port=2):
    return SocketRecord("tcp", local, local_port, remote, remote_port, state, pid, process)


@pytest.mark.slow
def test_a_local_cluster_listens_and_connects_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_loopback.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["violations"] == [], "\n".join(result["violations"])
    assert proc.returncode == 0
    assert result["node_ip"] == "127.0.0.1" and result["actor_ip"] == "127.0.0.1"
    assert result["all_reduce"] == [3.0, 3.0]
    assert result["serve"]["status"] == 200 and result["serve"]["reward"] == 1
    # the check saw the cluster: GCS, raylet, workers, Serve, gloo (not an empty list)
    assert result["sockets"] >= 20 and result["by_address"].get("local loopback", 0) == result["sockets"]


def test_local_ray_env_defaults_and_what_the_user_set():
    env = network.local_ray_env({})
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["RAY_AUTH_MODE"] == "disabled"
    assert env["http_proxy"] == env["HTTPS_PROXY"] == network.CLOSED_PROXY
    assert "127.0.0.1" in env["no_proxy"] and "localhost" in env["NO_PROXY"]
    if sys.platform.startswith("linux"):
        assert env["GLOO_SOCKET_IFNAME"] == "lo"
    # vLLM engines in the cluster: no usage report, no UDP probe of 8.8.8.8 to find an address
    assert env["VLLM_NO_USAGE_STATS"] == env["DO_NOT_TRACK"] == "1" and env["VLLM_HOST_IP"] == "127.0.0.1"
    user = network.local_ray_env({"RAY_USAGE_STATS_ENABLED": "1", "https_proxy": "http://proxy.corp:3128",
                                   "GLOO_SOCKET_IFNAME": "eth1", "RAY_AUTH_MODE": "token", "VLLM_HOST_IP": "10.1.2.3"})
    assert user["RAY_USAGE_STATS_ENABLED"] == "1" and user["RAY_AUTH_MODE"] == "token"
    assert user["VLLM_HOST_IP"] == "10.1.2.3"
    assert not any(k in user for k in network.PROXY_VARS) and "GLOO_SOCKET_IFNAME" not in user


def test_the_environment_is_restored_for_the_driver(monkeypatch):
    import ray._private.ray_constants as ray_constants

    for k in network.PROXY_VARS + ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    flag = ray_constants.ENABLE_RAY_CLUSTER
    with network.local_ray_environment():
        assert os.environ["http_proxy"] == network.CLOSED_PROXY
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert "http_proxy" not in os.environ and "no_proxy" not in os.environ
    assert ray_constants.ENABLE_RAY_CLUSTER == flag


@pytest.mark.parametrize("ip, expected", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("::ffff:192.0.2.2", False), ("10.0.0.1", False),
])
def test_is_loopback(ip, expected):
    assert network.is_loopback(ip) is expected


def test_violations_count_external_wildcard_and_metadata_only():
    ok = [rec("127.0.0.1", "127.0.0.1"), rec("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
          rec("127.0.0.1", "0.0.0.0", "LISTEN", remote_port=0), rec("::1", "::", "LISTEN", remote_port=0),
          rec("192.0.2.2", "8.8.8.8", process="sshd: root")]  # not a Ray process: not ours to judge
    bad = [rec("192.0.2.2", "192.0.2.2"), rec("0.0.0.0", "0.0.0.0", "LISTEN", process="ray::Actor", remote_port=0),
           rec("::", "::", "LISTEN", process="gcs_server", remote_port=0),
           rec("127.0.0.1", "10.1.2.3", process="ray::RuntimeEnv"),
           rec("0.0.0.0", "0.0.0.0", "LISTEN", process="VLLM::Worker", remote_port=0),  # a rollout actor's engine
           rec("192.0.2.2", "169.254.169.254", "TIME-WAIT", process="", pid=None)]  # owner gone: still counts
    assert network.violations(ok + bad) == bad
    # by pid: only the listed processes (and the metadata address, whoever)
    assert network.violations(ok + bad, pids={99}) == [bad[-1]]


def test_proc_net_addresses_are_decoded():
    # /proc/net/tcp writes IPv4 as one little-endian word, IPv6 as four
    assert network._addr("0100007F:1F90") == ("127.0.0.1", 8080)
    assert network._addr("00000000000000000000000001000000:0016") == ("::1", 22)
    assert network._addr("0000000000000000FFFF00000100007F:0050") == ("::ffff:127.0.0.1", 80)


def test_own_sockets_are_found_with_their_process():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        mine = [r for r in network.all_sockets() if r.local_port == port and r.state == "LISTEN"]
    assert mine and mine[0].pid == os.getpid() and mine[0].local == "127.0.0.1"
    assert os.getpid() in network.descendants(os.getppid())


def test_a_loopback_rendezvous_goes_through_a_file_and_opens_no_store_socket(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # what a local cluster's processes get
    port = network.rendezvous_port("127.0.0.1")
    network.join_process_group("gloo", "127.0.0.1", port, 0, 1, timeout_s=30)
    try:
        # a TCPStore client would resolve ::ffff:127.0.0.1 back to a name: a DNS query off the machine
        assert os.path.exists(network.store_path("127.0.0.1", port))
        listening = [r for r in network.all_sockets() if r.pid == os.getpid() and r.state == "LISTEN"]
        assert not [r for r in listening if r.local_port == port]
        assert all(network.is_loopback(r.local) for r in listening), listening
    finally:
        dist.destroy_process_group()
