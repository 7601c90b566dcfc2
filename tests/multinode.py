"""A Ray cluster of three nodes on 127.0.0.1, each with its own custom resource, for
tests/test_multinode.py: run as a script in a child process (the test session may already hold a
local Ray of its own), it starts the cluster, runs `aepo train` against it twice (two steps, then
`--resume` to four), reads where each role's actors ran, and prints one JSON line.

    python tests/multinode.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

NODES = {"head": 1, "learners": 2, "rollout": 1}  # name -> CPUs; the node declares resource f"{name}_node"
ROLE_OF = {"LearnerWorker": "learner", "RolloutService": "rollout", "EntropyControllerActor": "controller",
           "ServeReplica:aepo-reward:RewardServer": "reward"}  # Serve names a replica's class ServeReplica:<app>:<deployment>


def config(out: Path) -> dict:
    """The toy through the cluster: learners on one node, the rollout actor on another, the reward
    server's replica and the controller on the head (beside the driver)."""
    return {
        "run_name": "nodes",
        "algorithm": {"type": "aepo", "target": {"type": "constant", "value": 0.3}, "rule": {"m_up": 8, "m_down": 4},
                      "prompt_share": 1.0},
        "data": {"type": "countdown", "num_train": 8, "num_eval": 2, "seed": 0},
        "warm_start": {"steps": 0},
        "rollout": {"engine": "hf", "group_size": 4, "max_tokens": 16, "cpus_per_actor": 1,
                    "resources": {"rollout_node": 1}},
        "learner": {"num_workers": 2, "cpus_per_worker": 1, "micro_batch_size": 16, "resources": {"learners_node": 1}},
        "reward": {"mode": "serve", "resources": {"head_node": 1}},
        "controller": {"name": "nodes-controller", "resources": {"head_node": 1}},
        "trainer": {"steps": 4, "prompts_per_step": 2, "eval_every": 0, "eval_samples": 2, "save_every": 2,
                    "output_dir": str(out / "run"), "log_samples": 0, "export_policy": False},
    }


def _ports() -> dict:
    from services.backends.network import free_port

    names = ("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port", "runtime_env_agent_port",
             "node_manager_port", "object_manager_port")
    return {n: free_port() for n in names}


def start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": NODES["head"], "resources": {"head_node": 10}, "node_ip_address": "127.0.0.1",
        "include_dashboard": False, **_ports()})
    for name, cpus in NODES.items():
        if name != "head":
            cluster.add_node(num_cpus=cpus, resources={f"{name}_node": 10}, node_ip_address="127.0.0.1", **_ports())
    cluster.wait_for_nodes()
    return cluster


def train(cfg_path: Path, address: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address, "AEPO_CACHE": str(cfg_path.parent / "cache")}
    cmd = [sys.executable, "-m", "services.cli.train", "--config", str(cfg_path), "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def placements() -> dict[str, list[str]]:
    """Role -> the names of the nodes its actors ran on, dead actors included (the GCS's actor
    table: the public state API needs the dashboard, which this cluster does not start)."""
    import ray
    from ray._private.state import actors

    node_name = {n["NodeID"]: next((k[:-5] for k in n["Resources"] if k.endswith("_node")), "?") for n in ray.nodes()}
    out: dict[str, set[str]] = {}
    for a in actors().values():
        cls = a.get("ActorClassName") or ""
        role = ROLE_OF.get(cls)
        if role:
            out.setdefault(role, set()).add(node_name.get(a["Address"]["NodeID"], "?"))
    return {k: sorted(v) for k, v in out.items()}


def main(out: Path) -> None:
    import yaml

    from services.backends.network import local_ray_env

    os.environ.update(local_ray_env())  # before Ray is imported: its nodes stay on 127.0.0.1
    # three raylets and their workers on 2 cores start slowly; Serve's 5 s proxy readiness check
    # would kill the proxy as unhealthy before its process is up (read by the Serve controller)
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    import ray

    cluster = start_cluster()
    try:
        cfg_path = out / "nodes.yaml"
        cfg_path.write_text(yaml.safe_dump(config(out)))
        runs = [train(cfg_path, cluster.address, "trainer.steps=2"), train(cfg_path, cluster.address, "--resume")]
        for i, run in enumerate(runs):
            (out / f"train{i}.log").write_text(run.stdout + run.stderr)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            result = {"placements": placements(), "nodes": len(ray.nodes()), "exit": [r.returncode for r in runs]}
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]))
