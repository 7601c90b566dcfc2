"""Weight sync through a collective (`learner.sync_transport: collective`): one broadcast group of
learner rank 0 and every rollout engine, beside the learners' own process group.

The group is standalone: a `ProcessGroupGloo` (CPU learners) or `ProcessGroupNCCL` (GPU learners)
constructed on a store of its own, never `init_process_group` or `new_group`, so the learners'
default group and vLLM's groups stay as they are. Rank 0 is learner rank 0; the rollout engines
follow (an engine with k workers, e.g. vLLM with tensor parallelism, holds k consecutive ranks).

The driver sets the rendezvous up (`open_rendezvous`), loopback-safe as `join_process_group` is:
on a loopback node the members meet through a file (torch's TCPStore client would ask reverse DNS
about 127.0.0.1), else through a TCPStore the driver serves on its node address only. Gloo's
sockets bind the address each member is given (`host`), never the host name's interface.

A group has a name (its generation). Each process keeps its membership in a `SyncMember`, which
joins when a call brings a name it does not hold; the driver makes a new generation whenever the
members change or a round failed (services/rollout/pool.py), so a rollout actor that Ray restarts
simply joins the next one.

On the wire, per bucket: a header [index bytes, data bytes], the bucket's index as JSON (names,
dtypes, shapes, offsets: small), then the packed flat buffer (services/backends/weight_buckets.py);
a header of zeros ends the sync. Every receiver allocates a buffer of the header's size per bucket
and hands the views to its engine, which loads them while the next bucket arrives: at most two
buckets per process (rank 0 packs the next while one is in flight), never the whole model in one
place, and nothing through the driver. A fresh buffer per bucket (not one reused) because an engine
may keep views of a bucket until a layer is complete (vLLM's layerwise reload).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from services.backends.network import LOOPBACK, is_loopback, rendezvous_port, store_path
from services.backends.weight_buckets import prefetched, unpack_bucket


@dataclass(frozen=True)
class Rendezvous:
    """What every member needs to join one generation of the sync group (it travels to the actors)."""

    name: str
    backend: str  # gloo | nccl
    world_size: int
    timeout_s: float
    path: str | None = None  # a FileStore: every member on this (loopback) node
    addr: str | None = None  # else the driver's TCPStore
    port: int | None = None


@dataclass(frozen=True)
class SyncTicket:
    """What a rollout actor's `load_weights` gets instead of weights: receive them in this group, as
    `rank` (its first rank). `host` is the address its gloo sockets bind; the actor fills it in."""

    rendezvous: Rendezvous
    rank: int
    host: str | None = None

    def as_dict(self) -> dict:  # for vLLM's RPC to its workers: plain values only
        return {"rendezvous": vars(self.rendezvous), "rank": self.rank, "host": self.host}

    @staticmethod
    def from_dict(d: dict) -> "SyncTicket":
        return SyncTicket(Rendezvous(**d["rendezvous"]), d["rank"], d["host"])


@dataclass
class CollectiveWeights:
    """The driver's handle of a collective sync (what `LearnerGroup.weight_buckets` returns with
    `sync_transport: collective`): nothing is sent yet. `RolloutPool.load_weights` starts the
    learners' broadcast (`start_send`) and the engines' receive together, and keeps the handle to
    re-sync an actor that Ray restarts, which needs the learners to still hold these weights
    (`updates` is the learner group's update count when the handle was made)."""

    source: Any  # the LearnerGroup
    updates: int
    manifest: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.manifest.get("bytes", 0))

    def start_send(self, rendezvous: Rendezvous) -> list:
        """Every learner rank's `export_weights_collective` (rank 0 broadcasts; all take part in the
        gathers), as refs the caller waits on."""
        if getattr(self.source, "updates", None) != self.updates or not self.source.workers:
            raise RuntimeError("a collective re-sync needs the learners holding the weights it was made for; they have "
                               "been updated or replaced since (sync again from the learners' current weights)")
        return [w.export_weights_collective.remote(rendezvous) for w in self.source.workers]


def is_collective(weights: Any) -> bool:
    return isinstance(weights, CollectiveWeights)


def open_rendezvous(backend: str, world_size: int, timeout_s: float, node_ip: str) -> tuple[Rendezvous, Any]:
    """A new generation's rendezvous (the driver's side) and what must stay alive while it is used
    (the TCPStore the driver serves off loopback; None on loopback)."""
    name = f"aepo-sync-{uuid.uuid4().hex[:12]}"
    if is_loopback(node_ip):
        port = rendezvous_port(node_ip)  # a fresh file name, any file a killed group left there removed
        return Rendezvous(name, backend, world_size, timeout_s, path=store_path(node_ip, port) + "-sync"), None
    family = socket.AF_INET6 if ":" in node_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((node_ip, 0))  # this address only: torch's own server would listen on every interface
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    store = dist.TCPStore(node_ip, port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=sock.detach())
    return Rendezvous(name, backend, world_size, timeout_s, addr=node_ip, port=port), store


def _join(rdv: Rendezvous, rank: int, host: str | None, device: torch.device):
    timeout = datetime.timedelta(seconds=rdv.timeout_s)
    if rdv.path is not None:
        store = dist.FileStore(rdv.path, rdv.world_size)
    else:
        store = dist.TCPStore(rdv.addr, rdv.port, rdv.world_size, False, timeout=timeout)
    if rdv.backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host or LOOPBACK)]
        return dist.ProcessGroupGloo(store, rank, rdv.world_size, opts)
    if device.type != "cuda":
        raise ValueError(f"the weight-sync group is NCCL (GPU learners); this member's weights live on {device}: "
                         "put the rollout engines on GPUs too, or use learner.sync_transport object_store")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, rdv.world_size, opts)


class SyncMember:
    """One process's place in the sync group: joined when a call names a generation it does not hold."""

    def __init__(self):
        self.name: str | None = None
        self.pg = None

    def group(self, rdv: Rendezvous, rank: int, host: str | None, device: torch.device):
        if self.name != rdv.name:
            self.drop()
            self.pg, self.name = _join(rdv, rank, host, torch.device(device)), rdv.name
        return self.pg

    def drop(self) -> None:
        """Leave the group. Gloo closes a group's sockets only when the group object is destroyed
        (not on `abort` or `shutdown`), and then the peers blocked on this member fail at once
        instead of at the timeout: so callers hold no other reference to it, not even through a
        kept exception's traceback."""
        self.pg, self.name = None, None


def _bcast(pg, t: torch.Tensor, wait: bool = True):
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    work = pg.broadcast([t], opts)
    if wait:
        work.wait()
    return work


class Sender:
    """Rank 0's side: each packed bucket (its index, then its flat buffer) sent asynchronously, so
    the next bucket is gathered and packed while this one travels; at most two buckets are alive
    (the one in flight and the one being packed). `finish` sends the end mark."""

    def __init__(self, pg):
        self.pg, self._inflight = pg, None

    def send(self, index: list, data: torch.Tensor) -> None:
        meta = json.dumps(index).encode()
        head = torch.tensor([len(meta), data.numel()], dtype=torch.int64, device=data.device)
        meta_t = torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(data.device)
        self.wait()
        works = [_bcast(self.pg, t, wait=False) for t in (head, meta_t, data)]
        self._inflight = (works, (head, meta_t, data))  # the tensors stay alive until their sends end

    def wait(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            for work in inflight[0]:
                work.wait()

    def finish(self, device: torch.device) -> None:
        self.wait()
        _bcast(self.pg, torch.zeros(2, dtype=torch.int64, device=device))


def _receive_one(pg, device: torch.device):
    """The next bucket ({index, data}) or None at the end mark."""
    head = torch.empty(2, dtype=torch.int64, device=device)
    _bcast(pg, head)
    meta_len, data_len = (int(x) for x in head.tolist())
    if meta_len == 0:
        return None
    meta = torch.empty(meta_len, dtype=torch.uint8, device=device)
    _bcast(pg, meta)
    index = json.loads(meta.cpu().numpy().tobytes())
    data = torch.empty(data_len, dtype=torch.uint8, device=device)
    _bcast(pg, data)
    return {"index": index, "data": data}


def receive_buckets(pg, device: torch.device) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """A receiver: each bucket's (name, tensor) views, in the sender's order, until the end mark.

    On CPU (gloo, whose waits block the calling thread) the next bucket is received on a thread
    while the caller loads this one: two buckets held at most, as `iter_bucket_tensors` does. On
    GPU (NCCL) a wait only orders the CUDA streams, so the receives already overlap the loads."""
    if device.type != "cpu":
        while (bucket := _receive_one(pg, device)) is not None:
            yield unpack_bucket(bucket)
        return
    for bucket in prefetched(lambda: _receive_one(pg, device), "sync-recv"):
        yield unpack_bucket(bucket)


def receive_weights(member: SyncMember, ticket: SyncTicket, device: torch.device,
                    load: Callable[[Iterable[list[tuple[str, torch.Tensor]]]], None]) -> int:
    """A receiver's whole sync: join (if needed), feed the received buckets to `load` (an engine's
    bucket loader); returns the tensor bytes received.

    If `load` fails (a weight that does not fit), the rest of the round is still received and
    dropped before the error is raised: the sender and the other receivers finish normally and the
    group stays usable. If the transport fails (a peer died), the member leaves the group."""
    device = torch.device(device)
    stream = receive_buckets(member.group(ticket.rendezvous, ticket.rank, ticket.host, device), device)
    received, broken = 0, False

    def counted() -> Iterator[list[tuple[str, torch.Tensor]]]:
        nonlocal received, broken
        while True:
            try:
                bucket = next(stream)
            except StopIteration:
                return
            except BaseException:
                broken = True
                raise
            received += sum(t.numel() * t.element_size() for _, t in bucket)
            yield bucket

    try:
        load(counted())
        for _ in stream:  # a loader that stopped early still takes the round to its end mark
            pass
    except BaseException:
        if not broken:
            try:
                for _ in stream:
                    pass
            except BaseException:  # noqa: BLE001 - the original error is the one to report
                broken = True
        if broken:
            member.drop()
        raise
    return received


def node_ip() -> str:
    """This process's node address: the one Ray uses, else the vLLM host (a vLLM worker), else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - not a Ray process
        pass
    return os.environ.get("VLLM_HOST_IP") or LOOPBACK


def with_host(ticket: SyncTicket) -> SyncTicket:
    return replace(ticket, host=ticket.host or node_ip())
