"""The driver's `init_ray` joins a running cluster (RAY_ADDRESS, as in compose's `ray-head`) without
passing it resources, and starts a local one, not a join, when RAY_ADDRESS is unset.

Each driver runs in a child process (the test session may hold a local Ray of its own) against a
real `ray start --head` on 127.0.0.1 (tests/testlib.py `start_ray_head`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from testlib import start_ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
PROBE = "aepo_join_probe"  # a resource only the started head has

# The driver's init path with ray.init spied on: which keyword arguments it was given.
DRIVER = """
import json, sys
import ray

calls = []
real_init = ray.init

def spy(*args, **kwargs):
    calls.append(sorted(k for k, v in kwargs.items() if v is not None))
    return real_init(*args, **kwargs)

ray.init = spy
from services.backends.ray_cluster import init_ray

init_ray(num_cpus=int(sys.argv[1]))
ctx = ray.get_runtime_context()
print(json.dumps({"kwargs": calls, "resources": ray.cluster_resources(), "gcs": ctx.gcs_address}))
ray.shutdown()
"""


def _driver(env: dict, num_cpus: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(num_cpus)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def head():
    h = start_ray_head(num_cpus=2, resources={PROBE: 1})
    try:
        yield h
    finally:
        h.stop()


def test_the_driver_joins_the_running_cluster_without_resources(head):
    got = _driver({**head.env, "RAY_ADDRESS": head.address}, num_cpus=5)
    assert got["gcs"] == head.address
    # the head's 2 CPUs and its own resource, not a new local cluster of 5 CPUs
    assert got["resources"]["CPU"] == 2 and got["resources"].get(PROBE) == 1
    (kwargs,) = got["kwargs"]
    assert "address" in kwargs
    assert not {"num_cpus", "num_gpus", "resources", "object_store_memory", "_node_ip_address"} & set(kwargs), kwargs


def test_without_ray_address_the_driver_starts_its_own_cluster(head):
    """Even where `ray start` recorded a running cluster as the latest (ray_current_cluster, which Ray
    would connect to, then refuse num_cpus), a driver without RAY_ADDRESS starts a local one."""
    env = {k: v for k, v in head.env.items() if k != "RAY_ADDRESS"}
    # Ray looks for ray_current_cluster under $RAY_TMPDIR/ray: one that names the head (short: the
    # local cluster's unix sockets go there too, and their paths must stay under 107 bytes)
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(head.address)
        got = _driver({**env, "RAY_TMPDIR": tmp}, num_cpus=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert got["gcs"] != head.address
    assert got["resources"]["CPU"] == 3 and PROBE not in got["resources"]
    (kwargs,) = got["kwargs"]
    assert "num_cpus" in kwargs
