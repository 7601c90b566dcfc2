"""Weights on the wire in buckets: what the learners export and the rollout engines load, per sync.

A bucket is one flat byte buffer (a numpy uint8 array, which Ray stores zero-copy in its object
store and hands back as a read-only view) plus an index of the tensors in it: (name, dtype, shape,
offset, bytes), each tensor aligned to ALIGN bytes. `unpack_bucket` gives the tensors back as views
of that buffer: no copy on the receiving side until the engine copies them into its own weights.

`BucketedWeights` is the handle the driver passes around: the buckets in export order (Ray
ObjectRefs on the Ray backend, which the driver never resolves; the buckets themselves in one
process) and a small manifest. `iter_bucket_tensors` is the receiving side: it resolves one
bucket at a time (ray.get inside the rollout actor, the next one fetched while the current one
loads), so a rollout actor holds two buckets, never the whole model. The collective transport
(`learner.sync_transport: collective`, services/learner/collective.py) sends the same packed
buffers by broadcast instead, with the index beside each, and the engines unpack them the same way.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

ALIGN = 64  # bytes; any tensor's offset in a bucket is a multiple of it (a view of any dtype is valid)


@dataclass
class BucketedWeights:
    """The full weights of one sync, bucket by bucket: `buckets` (ObjectRefs or packed buckets, in
    order) and `manifest` ({dtype, buckets, bytes, tensors, transport}). Tied aliases (a tied
    `lm_head.weight`) are not sent: the engines' own weights share the storage, or, for vLLM,
    the engine restores them."""

    buckets: list[Any]
    manifest: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data across the buckets (what each engine receives)."""
        return int(self.manifest.get("bytes", 0))


def pack_bucket(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> dict:
    """One bucket: {"index": [(name, dtype, shape, offset, nbytes)], "data": uint8 array}.
    Floating-point tensors are written as `dtype` (None: as they are); others unchanged."""
    index, data = pack_flat(tensors, dtype)
    return {"index": index, "data": data.numpy()}


def pack_flat(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> tuple[list[tuple], torch.Tensor]:
    """`pack_bucket`'s index and its buffer as a uint8 tensor on `device` (the collective transport
    packs on the learner's GPU, so NCCL sends the bucket without a trip through host memory)."""
    items = []
    offset = 0
    for name, t in tensors:
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        items.append((name, t, out_dtype, offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    data = torch.empty(offset, dtype=torch.uint8, device=device)
    index = []
    for name, t, out_dtype, off, nbytes in items:
        if nbytes:
            data[off : off + nbytes].view(out_dtype).view(t.shape).copy_(t.detach())
        index.append((name, str(out_dtype).removeprefix("torch."), tuple(t.shape), off, nbytes))
    return index, data


def unpack_bucket(bucket: dict) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors as views of its buffer (read-only when the buffer is Ray's: copy them
    into a model, do not write to them). `data` is a numpy array, or a uint8 tensor (a bucket
    received through the collective, on the receiver's device)."""
    data = bucket["data"]
    if not isinstance(data, torch.Tensor):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(data)
    out = []
    for name, dtype, shape, off, nbytes in bucket["index"]:
        dt = getattr(torch, dtype)
        t = data[off : off + nbytes].view(dt).view(shape) if nbytes else torch.empty(shape, dtype=dt, device=data.device)
        out.append((name, t))
    return out


def bucket_bytes(bucket: dict) -> int:
    """Tensor bytes in a packed bucket (its padding left out)."""
    return sum(entry[4] for entry in bucket["index"])


def iter_bucket_tensors(weights: BucketedWeights) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Each bucket's (name, tensor) pairs, in order. ObjectRefs are resolved here, one at a time,
    with the next one fetched (on a thread) while the caller loads the current one: at most two
    buckets are held, and on a multi-node cluster the transfer overlaps the load."""
    items = weights.buckets
    if not any(_is_ref(item) for item in items):
        for item in items:
            yield unpack_bucket(item)
        return
    import ray

    pending = iter(items)

    def fetch() -> dict | None:
        item = next(pending, None)
        return ray.get(item) if item is not None and _is_ref(item) else item

    for bucket in prefetched(fetch, "bucket-fetch"):
        yield unpack_bucket(bucket)


def prefetched(fetch: Callable[[], Any], thread_name: str) -> Iterator[Any]:
    """`fetch()`'s items until it returns None, the next one fetched on a thread while the caller
    uses the current one: at most two are held. Both receiving sides of the weight sync use it
    (the object store's buckets above, the collective's in services/learner/collective.py)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name) as fetcher:
        nxt = fetcher.submit(fetch)
        while (item := nxt.result()) is not None:
            nxt = fetcher.submit(fetch)
            yield item
            del item  # an object store's pin on a bucket goes with the last view of it


def _is_ref(item: Any) -> bool:
    return not isinstance(item, dict)  # a packed bucket is a dict; anything else is an ObjectRef to one


def is_bucketed(weights: Any) -> bool:
    """Whether `weights` is a bucketed handle (else a state dict, or an ObjectRef to one)."""
    return isinstance(weights, BucketedWeights)


def as_bucketed(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> BucketedWeights:
    """A state dict as one in-memory bucket (tests, and callers holding a plain dict)."""
    bucket = pack_bucket(state.items(), dtype)
    return BucketedWeights([bucket], {"buckets": 1, "bytes": bucket_bytes(bucket), "tensors": len(state),
                                      "dtype": str(dtype or "as stored").removeprefix("torch."), "transport": "memory"})
