"""The output-directory probe: every node must see the driver's probe file and the driver theirs."""

from __future__ import annotations

import pytest

from services.backends import storage


def test_a_relative_output_dir_is_refused_on_a_cluster_only():
    storage.require_absolute("runs/x", on_cluster=False)
    storage.require_absolute("/shared/runs/x", on_cluster=True)
    with pytest.raises(ValueError, match="'runs/x' is relative: on a cluster"):
        storage.require_absolute("runs/x", on_cluster=True)


def test_every_node_of_the_local_cluster_sees_the_directory_and_no_probe_is_left(ray_local, tmp_path):
    nodes = storage.check_shared(str(tmp_path))
    assert nodes == ["127.0.0.1"]
    assert list(tmp_path.iterdir()) == []


def test_a_node_that_cannot_see_the_directory_is_named(ray_local, tmp_path):
    """What an unmounted volume looks like: a node whose directory lacks the driver's probe, and a
    node whose probe file the driver cannot find."""
    import ray

    found = ray.get(ray.remote(num_cpus=0)(storage.node_probe).remote(str(tmp_path), "driver-missing", "t"))
    assert found["node"] == "127.0.0.1" and "cannot read the driver's probe file" in found["error"]
    problems = storage.unshared(str(tmp_path), "t", [{"node": "10.0.0.7", "error": "cannot read the driver's probe file"},
                                                      {"node": "10.0.0.8", "file": "node-10.0.0.8-abc"}])
    assert problems == ["node 10.0.0.7: cannot read the driver's probe file",
                        "node 10.0.0.8: wrote node-10.0.0.8-abc, which the driver cannot read"]
