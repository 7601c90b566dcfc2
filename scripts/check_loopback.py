#!/usr/bin/env python3
"""Start the project's local Ray the way `aepo train` does and check that it stays on loopback.

    .venv/bin/python scripts/check_loopback.py                    # this script's cluster only
    .venv/bin/python scripts/check_loopback.py --scope machine    # every Ray process on the machine
    .venv/bin/python scripts/check_loopback.py --watch &          # until SIGINT/SIGTERM: every Ray
                                                                  # process the machine runs meanwhile

It runs `services.backends.ray_cluster.init_ray`, one actor call, a request to the reward server on Ray Serve
and an all-reduce in a two-actor gloo group (what the learners and the Ray Train warm start use),
while a thread reads /proc/net every 50 ms. It fails (exit 1) if any socket of a process in the
cluster (`--scope machine`: of any Ray process on the machine, leftovers included) is bound to or
connected to an address outside 127.0.0.0/8, wildcard binds included, or if any process on the
machine opened a connection to the cloud metadata address 169.254.169.254. It prints a summary
(sockets by address class) and one JSON line. `--watch` starts nothing and samples every
0.5 s until it is signalled (.ci/run wraps the test suite in it); TIME-WAIT entries outlive a
connection by a minute, so a probe to the metadata address is still caught.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.backends import network  # noqa: E402


class Watcher(threading.Thread):
    """Reads every socket on the machine until stopped; keeps what breaks the rule."""

    def __init__(self, scope: str, interval_s: float = 0.05):
        super().__init__(daemon=True)
        self.scope, self.interval_s = scope, interval_s
        self.stop_event = threading.Event()
        self.bad: dict[tuple, network.SocketRecord] = {}
        self.seen: dict[tuple, network.SocketRecord] = {}
        self.before = {(s.local, s.local_port, s.remote, s.remote_port) for s in network.all_sockets()
                       if s.remote == network.METADATA_ADDRESS}  # older than this check: not ours

    def _ours(self) -> set[int] | None:
        # machine scope: any Ray process (by command line), whoever started it
        return network.descendants(os.getpid()) if self.scope == "tree" else None

    def sample(self) -> None:
        pids = self._ours()
        sockets = network.all_sockets()
        for s in sockets:
            if s.pid is not None and (s.pid in pids if pids is not None else network.is_ray_process(s.process)):
                self.seen[(s.proto, s.local, s.local_port, s.remote, s.remote_port, s.pid)] = s
        for s in network.violations(sockets, pids):
            if (s.local, s.local_port, s.remote, s.remote_port) not in self.before:
                self.bad[(s.proto, s.local, s.local_port, s.remote, s.remote_port, s.state)] = s

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            time.sleep(self.interval_s)


def exercise() -> dict:
    """What a run does over the network: an actor call, a Serve request, a gloo all-reduce."""
    import httpx
    import ray

    from reward_server.serve_deploy import deploy
    from services.backends.ray_cluster import init_ray

    init_ray(num_cpus=2)
    out = {"node_ip": ray.nodes()[0]["NodeManagerAddress"]}

    @ray.remote(num_cpus=0)
    class Member:
        """One rank of the two-actor gloo group."""

        def address(self):
            from services.backends.network import rendezvous_port

            ip = ray.util.get_node_ip_address()
            return ip, rendezvous_port(ip)

        def all_reduce(self, rank: int, master: str, port: int) -> float:
            import torch
            import torch.distributed as dist

            from services.backends.network import join_process_group

            join_process_group("gloo", master, port, rank, 2, timeout_s=60)
            t = torch.ones(1) * (rank + 1)
            dist.all_reduce(t)
            dist.destroy_process_group()
            return float(t)

    members = [Member.remote(), Member.remote()]
    master, port = ray.get(members[0].address.remote(), timeout=120)
    out["actor_ip"] = master
    out["all_reduce"] = ray.get([m.all_reduce.remote(i, master, port) for i, m in enumerate(members)], timeout=120)
    url = deploy(replicas=1)
    r = httpx.post(f"{url}/v1/verify", json={"items": [{"id": "1", "task": "exact", "response": "a", "reference": "a"}]},
                   timeout=60)
    out["serve"] = {"url": url, "status": r.status_code, "reward": r.json()["results"][0]["reward"]}
    return out


def summary(records) -> dict:
    def cls(ip: str) -> str:
        if network.is_loopback(ip):
            return "loopback"
        return "wildcard" if network.is_unspecified(ip) else "external"

    counts: dict[str, int] = {}
    for s in records:
        key = f"local {cls(s.local)}"
        counts[key] = counts.get(key, 0) + 1
        if s.state != "LISTEN" and not network.unconnected(s):
            key = f"remote {cls(s.remote)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scope", choices=("tree", "machine"), default="tree")
    ap.add_argument("--watch", action="store_true", help="start nothing; watch every Ray process until signalled")
    ap.add_argument("--settle-s", type=float, default=3.0, help="keep watching this long after the work")
    args = ap.parse_args()
    if args.watch:
        args.scope = "machine"
    elif os.environ.get("RAY_ADDRESS"):
        print("check_loopback: RAY_ADDRESS is set; this checks a local cluster only", file=sys.stderr)
        return 2
    watcher = Watcher(args.scope, interval_s=0.5 if args.watch else 0.05)
    watcher.start()
    result: dict = {}
    try:
        if args.watch:
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
        else:
            result = exercise()
            time.sleep(args.settle_s)  # the dashboard's usage module and the agents start late
    finally:
        watcher.stop_event.set()
        watcher.join()
        watcher.sample()
    return report(watcher, result, args.scope, args.watch)


def report(watcher: Watcher, result: dict, scope: str, watched: bool) -> int:
    bad = list(watcher.bad.values())
    result.update(scope=scope, sockets=len(watcher.seen), by_address=summary(watcher.seen.values()),
                  violations=[str(s) for s in bad])
    whose = "this cluster" if scope == "tree" else "Ray processes on the machine"
    print(f"check_loopback: {len(watcher.seen)} sockets of {whose}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(result["by_address"].items())))
    for s in bad:
        print(f"  OUTSIDE LOOPBACK: {s}")
    print(json.dumps(result))
    if not watched:
        import ray

        ray.shutdown()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
