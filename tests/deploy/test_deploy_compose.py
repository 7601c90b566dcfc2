"""docker-compose.yml validated offline by the Compose v2 binary (no Docker engine needed)."""

from __future__ import annotations

import json

import pytest
from _deploy_helpers import COMPOSE_FILE, ROOT, compose_binary, run, show


@pytest.fixture(scope="module")
def config() -> dict:
    """The compose file as Compose itself resolves it (anchors merged, paths absolute)."""
    proc = run([compose_binary(), "-f", str(COMPOSE_FILE), "config", "--format", "json"])
    assert proc.returncode == 0, show(proc)
    return json.loads(proc.stdout)


def test_compose_config_quiet():
    proc = run([compose_binary(), "-f", str(COMPOSE_FILE), "config", "--quiet"])
    assert proc.returncode == 0, show(proc)


@pytest.mark.parametrize(
    "old, new",
    [
        ("    shm_size:", "    shm_sise:"),  # a typo'd key
        ('      - "127.0.0.1:9090:9090"', '      - "127.0.0.1:9090:abc"'),  # a bad port
        ("        condition: service_healthy", "        condition: service_happy"),
    ],
)
def test_compose_rejects_a_broken_file(tmp_path, old, new):
    text = COMPOSE_FILE.read_text()
    assert old in text
    (tmp_path / "docker-compose.yml").write_text(text.replace(old, new, 1))
    proc = run([compose_binary(), "-f", str(tmp_path / "docker-compose.yml"), "config", "--quiet"], cwd=tmp_path)
    assert proc.returncode != 0, show(proc)


def test_services(config):
    assert set(config["services"]) == {"redis", "ray-head", "reward-server", "prometheus", "grafana"}


def test_host_ports_are_loopback_only(config):
    for name, svc in config["services"].items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_ray_head(config):
    head = config["services"]["ray-head"]
    assert head["build"]["dockerfile"] == "deploy/docker/Dockerfile" and head["build"]["target"] == "cpu"
    cmd = head["command"]
    assert cmd[:4] == ["ray", "start", "--head", "--block"]
    assert "--dashboard-host=0.0.0.0" in cmd and "--metrics-export-port=8080" in cmd
    # `aepo train` in the container joins this head (services/backends/ray_cluster.py init_ray) at
    # its own host name and GCS port, instead of starting a second Ray
    assert "--port=6379" in cmd and head["hostname"] == "ray-head"
    assert head["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert {p["target"] for p in head["ports"]} >= {8265, 9400, 8080}
    assert any(v["target"] == "/tmp/ray" and v["source"] == "ray-tmp" for v in head["volumes"])


def test_reward_server(config):
    svc = config["services"]["reward-server"]
    assert svc["image"] == config["services"]["ray-head"]["image"]
    cmd = svc["command"]
    assert cmd[:2] == ["aepo", "serve-reward"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"


def test_prometheus_sees_config_rules_and_ray_discovery(config):
    svc = config["services"]["prometheus"]
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/etc/prometheus"]["source"] == str(ROOT / "deploy" / "prometheus")
    assert mounts["/tmp/ray"]["source"] == "ray-tmp"  # prom_metrics_service_discovery.json
    assert "--config.file=/etc/prometheus/prometheus.yml" in svc["command"]


def test_grafana_is_provisioned(config):
    mounts = {v["target"]: v["source"] for v in config["services"]["grafana"]["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == str(ROOT / "deploy" / "grafana" / "provisioning")
