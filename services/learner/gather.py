"""The full state dict from FSDP2 shards in a few flat, bucketed all-gathers (for weight sync).

`gather_full_state` returns the whole dict (tests, export, the legacy sync); `gather_plan` +
`iter_gathered` stream the same tensors bucket by bucket, optionally cast to the sync dtype
before the all-gather (half the bytes in bfloat16), which is how `services/learner/sync.py`
exports the weights without ever holding the full float32 dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


def _shard0_local(param) -> torch.Tensor | None:
    """The local shard of an FSDP2 parameter sharded along dim 0 over a 1-D mesh, else None."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor) or param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        return None
    return param.to_local()


@dataclass
class GatherPlan:
    """What every rank agreed on before the bucketed all-gathers: the parameters, their local
    shards, the rows each rank holds of each, and the model's state-dict layout."""

    params: list  # (name, parameter), model.named_parameters() order (a tied weight once)
    locals_: list[torch.Tensor]
    all_rows: list[list[int]]  # [rank][parameter] rows of dim 0 held there
    by_id: dict[int, str]  # id(parameter) -> its name in `params`
    layout: dict  # model.state_dict(keep_vars=True): every key, tied aliases and buffers included

    def extra_entries(self) -> dict[str, torch.Tensor]:
        """State entries that are not parameters (unsharded buffers), as CPU copies."""
        return {key: t.detach().cpu().clone() for key, t in self.layout.items() if id(t) not in self.by_id}


def gather_plan(model) -> GatherPlan | None:
    """The plan (after one small all-gather of the row counts; a collective), or None when some
    parameter is not a dim-0 shard (then use torch's get_model_state_dict)."""
    params = list(model.named_parameters())
    if not dist.is_initialized() or not params:
        return None
    locals_ = [_shard0_local(p) for _, p in params]
    if any(t is None for t in locals_):
        return None
    by_id = {id(p): name for name, p in params}
    layout = model.state_dict(keep_vars=True)
    if any(id(t) not in by_id and _shard0_local(t) is not None for t in layout.values()):
        return None  # a sharded state entry that is not a parameter: leave it to torch
    world = dist.get_world_size()
    device = locals_[0].device
    rows = torch.tensor([t.shape[0] if t.dim() else 0 for t in locals_], dtype=torch.long, device=device)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    return GatherPlan(params, locals_, [r.cpu().tolist() for r in all_rows], by_id, layout)


def iter_gathered(plan: GatherPlan, bucket_bytes: int, dtype: torch.dtype | None = None,
                  own: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """{parameter name: full CPU tensor} per bucket of about `bucket_bytes` (of the parameters as
    stored); every rank gets every bucket (a collective: consume it on every rank). `dtype`:
    floating-point shards are cast to it before they travel (rounding is per element, so the
    result equals gathering first and casting after). `own` False: with one rank the tensors are
    views of the bucket's buffer (no copy), valid as long as they are kept."""
    bucket: list[int] = []
    size = 0
    for i, (_, p) in enumerate(plan.params):
        bucket.append(i)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes or i == len(plan.params) - 1:
            out: dict[str, torch.Tensor] = {}
            _gather_bucket(plan, bucket, out, dtype, own)
            yield out
            bucket, size = [], 0


def gather_full_state(model, bucket_bytes: int) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict (every rank gets it) from flat bucketed all-gathers, or None when some
    parameter is not a dim-0 shard (then use torch's get_model_state_dict).

    Rank r's shard of a parameter is rows [start_r, start_r + n_r) of it; the rows each rank holds
    are exchanged first (one small all-gather), then each bucket of parameters travels as one flat
    tensor per rank, padded to the longest rank's length. The keys are the model's state-dict
    keys, tied weights (`lm_head.weight`) and unsharded buffers included, as torch's gather gives.
    """
    plan = gather_plan(model)
    if plan is None:
        return None
    out: dict[str, torch.Tensor] = {}
    for part in iter_gathered(plan, bucket_bytes):
        out.update(part)
    return {
        key: out[plan.by_id[id(t)]] if id(t) in plan.by_id else t.detach().cpu().clone() for key, t in plan.layout.items()
    }


def _gather_bucket(plan: GatherPlan, bucket: list[int], out: dict, dtype: torch.dtype | None, own: bool) -> None:
    """One flat all-gather of the bucket's shards; `own`: every tensor its own storage (else a
    one-rank group's tensors are views of the bucket's buffer, which the export packs at once)."""
    params, locals_, all_rows = plan.params, plan.locals_, plan.all_rows
    world = len(all_rows)
    kinds = {dtype if dtype is not None and locals_[i].is_floating_point() else locals_[i].dtype for i in bucket}
    if len(kinds) > 1:  # mixed dtypes: one bucket per parameter
        for i in bucket:
            _gather_bucket(plan, [i], out, dtype, own)
        return
    row_numel = [math.prod(params[i][1].shape[1:]) for i in bucket]
    lengths = [sum(all_rows[r][i] * n for i, n in zip(bucket, row_numel)) for r in range(world)]
    # the rank's shards cast and concatenated in one pass, zero-padded to the longest rank's length
    flat = locals_[bucket[0]].new_empty(max(lengths), dtype=kinds.pop())
    offset = 0
    for i in bucket:
        n = locals_[i].numel()
        flat[offset : offset + n].copy_(locals_[i].reshape(-1))
        offset += n
    flat[offset:].zero_()
    if world == 1:
        parts = [flat]
    else:
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
    parts = [t.cpu() for t in parts]
    offsets = [0] * world
    for i, n in zip(bucket, row_numel):
        name, p = params[i]
        pieces = []
        for r in range(world):
            k = all_rows[r][i] * n
            pieces.append(parts[r][offsets[r] : offsets[r] + k])
            offsets[r] += k
        full = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone() if own else pieces[0]
        out[name] = full.view(p.shape)
