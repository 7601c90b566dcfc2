"""Weight sync, learner side: the full weights streamed bucket by bucket, in the sync dtype.

Each step the rollout engines need the learners' new weights. The path (`learner.sync_dtype`,
`learner.sync_bucket_mb`):

1. every learner rank runs `LearnerWorker.export_weights`, a generator: the FSDP2 shards travel
   in flat all-gathers of `sync_bucket_mb` (services/learner/gather.py), cast to the sync dtype
   before they travel; rank 0 packs each gathered bucket into one flat buffer
   (services/backends/weight_buckets.py) and yields it, then a small manifest. On Ray the method
   is a streaming generator: each yielded bucket is written to the object store by the learner's
   own process as soon as it is ready, and the refs belong to the driver (the caller), so a kept
   bucket outlives a learner rank that dies;
2. the driver (`LearnerGroup.weight_buckets`, `bucket_refs` below) waits for the export to
   finish, takes rank 0's refs without resolving them and reads only the manifest: the tensors
   never reach the driver;
3. the rollout pool hands the same `BucketedWeights` (a list of refs) to every rollout actor, and
   keeps it to re-sync an actor that Ray restarts; each actor fetches the buckets one at a time
   and its engine loads them one at a time (services/rollout/service.py).

The full float32 dict exists nowhere on this path: rank 0 holds one gathered bucket and its
packed copy at a time, the object store the packed buckets (half the float32 bytes in bfloat16).

The sync dtype: `auto` is what the engines compute in by default, so it changes no sample:
float32 for CPU learners (the CPU engines compute in float32: bfloat16 weights would change the
toy's samples), and on GPU the checkpoint's dtype (bfloat16 for Qwen2.5; the GPU engines' `auto`
dtype is the checkpoint's, and rounding float32 to it on the wire or in the engine gives the same
bits).

The collective transport (`learner.sync_transport: collective`, services/learner/collective.py):
the same buckets, broadcast instead of stored. `LearnerGroup.weight_buckets` returns a
`CollectiveWeights` handle that carries nothing; `RolloutPool.load_weights` (through
services/rollout/collective_sync.py) starts every learner rank's `export_weights_collective`
(`broadcast_export` below: the same gathers, rank 0 packs each bucket, on the GPU for NCCL, and
broadcasts it) and every rollout actor's receive together, then waits on both. Learner rank 0 and
the engines (each vLLM worker) form one standalone group, gloo for CPU learners and NCCL on GPU,
beside the learners' own; each bucket's index travels ahead of its flat buffer, and every engine
receives into a buffer of the index's size and loads the views (`unpack_bucket`) before the next
bucket, so nothing passes through the driver or the object store and no process holds the whole
model. The pool keeps the handle; an actor that Ray restarts is re-synced by a broadcast of its own
(learner rank 0 and that actor, in a new group; the learners still hold the synced weights, which
the handle checks), and the next sync makes a new group of everyone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from services.backends.weight_buckets import BucketedWeights, bucket_bytes, pack_bucket

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(model_path: str) -> torch.dtype | None:
    """The dtype config.json names (`torch_dtype`, or transformers 5's `dtype`), if any."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or ""))


def resolve_sync_dtype(setting: str, device: torch.device | str, model_path: str) -> torch.dtype:
    """`learner.sync_dtype` as a torch dtype: auto = float32 on CPU, the checkpoint's dtype on GPU
    (bfloat16 when config.json names none)."""
    if setting != "auto":
        return _DTYPES[setting]
    if torch.device(device).type == "cpu":
        return torch.float32
    return checkpoint_dtype(model_path) or torch.bfloat16


def full_state(model, cfg, rank: int) -> dict[str, torch.Tensor] | None:
    """The unsharded float32 weights on CPU on rank 0 (None elsewhere); a collective.

    FSDP2 shards every parameter along dim 0, so the full tensor is the ranks' local shards
    concatenated in rank order; `gather_full_state` moves them in a few flat all-gathers (one per
    `cfg.sync_bucket_mb`) instead of one collective per parameter, which was 85 % of the
    weight-sync time of the tiny model. Anything else falls back to torch's own gather.
    """
    from services.learner.gather import gather_full_state

    sd = gather_full_state(model, cfg.sync_bucket_mb * 2**20) if cfg.fast_gather else None
    if sd is None:
        sd = _torch_full_state(model)
    return sd if rank == 0 else None


def _torch_full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def tied_aliases(model) -> dict[str, str]:
    """{state-dict key: the key it shares its tensor with} (a tied `lm_head.weight` -> the embedding)."""
    first: dict[int, str] = {}
    aliases = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[key] = first[id(t)]
        else:
            first[id(t)] = key
    return aliases


def _gathered_buckets(model, cfg, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """{name: full tensor} per bucket, on every rank (a collective): the flat all-gathers when the
    layout allows, else torch's full state dict cut into buckets. Tied aliases left out."""
    from services.learner.gather import gather_plan, iter_gathered

    bucket = cfg.sync_bucket_mb * 2**20
    plan = gather_plan(model) if cfg.fast_gather else None
    if plan is not None:
        yield from iter_gathered(plan, bucket, dtype, own=False)  # packed at once: views suffice
        extra = plan.extra_entries()
        if extra:
            yield extra
        return
    aliases = tied_aliases(model)
    part: dict[str, torch.Tensor] = {}
    size = 0
    for key, t in _torch_full_state(model).items():
        if key in aliases:
            continue
        part[key] = t
        size += t.numel() * t.element_size()
        if size >= bucket:
            yield part
            part, size = {}, 0
    if part:
        yield part


def export_buckets(model, cfg, rank: int, dtype: torch.dtype) -> Iterator[Any]:
    """Rank 0: each packed bucket, then the manifest {dtype, buckets, bytes, tensors, aliases};
    other ranks take part in the gathers and yield nothing. A collective: run it on every rank."""
    count = nbytes = tensors = 0
    for part in _gathered_buckets(model, cfg, dtype):
        if rank != 0:
            continue
        packed = pack_bucket(part.items(), dtype)
        del part
        count, nbytes, tensors = count + 1, nbytes + bucket_bytes(packed), tensors + len(packed["index"])
        yield packed
    if rank == 0:
        yield _manifest(model, dtype, count, nbytes, tensors)


def _manifest(model, dtype: torch.dtype, count: int, nbytes: int, tensors: int) -> dict:
    """What rank 0 reports of an export, whichever transport carried it."""
    return {"dtype": str(dtype).removeprefix("torch."), "buckets": count, "bytes": nbytes, "tensors": tensors,
            "aliases": tied_aliases(model)}


def broadcast_export(model, cfg, rank: int, dtype: torch.dtype, member, rendezvous, host: str | None,
                     device: torch.device) -> dict | None:
    """The collective transport's export (services/learner/collective.py): every rank takes part in
    the gathers; rank 0 packs each bucket on `device` (the GPU for NCCL, else the CPU) and broadcasts
    it to the engines, then the end mark; it returns the manifest, the others None.

    A broadcast that fails (a receiver died, or never joined) stops rank 0's broadcasting, not its
    gathers: the other ranks are in the same all-gathers and would wait on rank 0 until the learners'
    collective timeout. The failure is reported in the manifest (`error`), for the driver to restart
    the receivers and run the round again."""
    from services.backends.weight_buckets import pack_flat
    from services.learner.collective import Sender

    count = nbytes = tensors = 0
    error = None  # its text only: a kept exception's traceback would keep the broken group (and its sockets)
    sender = None
    if rank == 0:
        try:
            sender = Sender(member.group(rendezvous, 0, host, device))
        except Exception as exc:  # noqa: BLE001 - reported below, after the gathers
            error = f"{type(exc).__name__}: {exc}"
    for part in _gathered_buckets(model, cfg, dtype):
        if rank != 0 or error is not None:
            continue
        try:
            index, data = pack_flat(part.items(), dtype, device)
            del part
            sender.send(index, data)  # waits for the previous bucket's sends first
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            sender = None  # with the member's reference gone, the group closes: receivers blocked on it fail now
            member.drop()
            continue
        count, nbytes, tensors = count + 1, nbytes + bucket_bytes({"index": index}), tensors + len(index)
    if rank != 0:
        return None
    if error is None:
        try:
            sender.finish(device)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            sender = None
            member.drop()
    manifest = {**_manifest(model, dtype, count, nbytes, tensors), "transport": "collective"}
    if error is not None:
        manifest["error"] = error
    return manifest


def bucket_refs(generators: list, timeout_s: float) -> BucketedWeights:
    """The driver's side of a Ray export: wait until every rank's `export_weights` stream has
    finished (a dead rank is a RoleFailure, a stuck one a RoleTimeout), then take rank 0's refs
    unresolved and fetch only the last one, the manifest."""
    from services.backends.remote import get_one, wait_all

    wait_all([g.completed() for g in generators], timeout_s, "learner", "learners: exporting the weights")
    refs = list(generators[0])  # every item is ready: this takes the refs, it fetches nothing
    if not refs:
        raise RuntimeError("learner rank 0 exported no weights")
    manifest = get_one(refs[-1], timeout_s, "learner", "the weights' manifest")
    if manifest.get("buckets") != len(refs) - 1:
        raise RuntimeError(f"learner rank 0 exported {len(refs) - 1} buckets, its manifest says {manifest.get('buckets')}")
    return BucketedWeights(refs[:-1], {**manifest, "transport": "object_store"})


def local_buckets(stream: Iterator[Any]) -> BucketedWeights:
    """An in-process export (one rank): the packed buckets themselves and the manifest."""
    items = list(stream)
    return BucketedWeights(items[:-1], {**items[-1], "transport": "memory"})
