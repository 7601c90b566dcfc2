"""The run's output directory must be one directory for every node: a probe before anything starts.

Learner ranks write their checkpoint shards where they run, and the driver commits a checkpoint
only when it sees every shard (services/loop/checkpoint.py). On a cluster whose nodes do not share
`trainer.output_dir` that check would refuse every checkpoint, hours in. So at start the driver
writes a probe file there, a zero-CPU task on every alive node reads it and writes its own, and
the driver reads those back: a node that cannot see the driver's file, or whose file the driver
cannot see, stops the run at once, named. On a cluster the directory must also be absolute:
`ray job submit` runs the driver in a working-directory copy that Ray deletes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PROBE_DIR = ".aepo-probe"


def require_absolute(output_dir: str, on_cluster: bool) -> None:
    """A relative output directory on a cluster lands in Ray's temporary working-directory copy."""
    if on_cluster and not os.path.isabs(output_dir):
        raise ValueError(f"trainer.output_dir {output_dir!r} is relative: on a cluster (RAY_ADDRESS set) it must be "
                         "an absolute path on a volume every node mounts (the driver runs in a working-directory copy "
                         "that Ray deletes)")


def write_probe(directory: str, who: str, token: str) -> str:
    """Write `token` to a new probe file under `directory`; returns its name."""
    from services.loop.durable import write_text

    probe = Path(directory) / PROBE_DIR
    probe.mkdir(parents=True, exist_ok=True)
    name = f"{who}-{uuid.uuid4().hex[:8]}"
    write_text(probe / name, token)
    return name


def node_probe(directory: str, driver_file: str, token: str) -> dict:
    """On one node: can it read the driver's probe, and write its own? Returns what it found."""
    import ray

    node = ray.util.get_node_ip_address()
    seen = Path(directory) / PROBE_DIR / driver_file
    try:
        ok = seen.read_text() == token
    except OSError:
        ok = False
    if not ok:
        return {"node": node, "error": f"cannot read the driver's probe file {seen}"}
    try:
        return {"node": node, "file": write_probe(directory, f"node-{node}", token)}
    except OSError as exc:
        return {"node": node, "error": f"cannot write to {directory} ({exc})"}


def check_shared(output_dir: str, timeout_s: float = 120.0) -> list[str]:
    """Probe every alive node; returns their addresses, or raises naming each node that failed."""
    directory = os.path.abspath(output_dir)
    token = uuid.uuid4().hex
    driver_file = write_probe(directory, "driver", token)
    found: list[dict] = []
    try:
        found = _probe_nodes(directory, driver_file, token, timeout_s)
        problems = unshared(directory, token, found)
    finally:
        _clean(directory, [driver_file] + [f["file"] for f in found if "file" in f])
    if problems:
        raise RuntimeError(f"trainer.output_dir {directory} is not one directory on every node: " + "; ".join(problems)
                           + ". Mount the same volume at this path on every node (docker compose and the KubeRay "
                           "manifests mount the runs volume).")
    return [f["node"] for f in found]


def _probe_nodes(directory: str, driver_file: str, token: str, timeout_s: float) -> list[dict]:
    """`node_probe` as a zero-CPU task pinned to each alive node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(node_probe)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(directory, driver_file, token)
            for n in nodes]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise RuntimeError(f"{len(pending)} of {len(refs)} nodes did not answer the output-directory probe within {timeout_s:g} s")
    return ray.get(refs)


def unshared(directory: str, token: str, found: list[dict]) -> list[str]:
    """What went wrong, node by node: a probe a node could not read or write, or a node's probe
    file the driver cannot read back."""
    problems = [f"node {f['node']}: {f['error']}" for f in found if "error" in f]
    for f in found:
        path = Path(directory) / PROBE_DIR / f.get("file", "")
        if "file" in f and (not path.is_file() or path.read_text() != token):
            problems.append(f"node {f['node']}: wrote {path.name}, which the driver cannot read")
    return problems


def _clean(directory: str, names: list[str]) -> None:
    probe = Path(directory) / PROBE_DIR
    for name in names:
        (probe / name).unlink(missing_ok=True)
    try:
        probe.rmdir()
    except OSError:  # another run's probe in flight, or not empty: leave it
        pass
