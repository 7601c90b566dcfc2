"""The full state dict from FSDP2 shards in a few flat, bucketed all-gathers (for weight sync)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _shard0_local(param) -> torch.Tensor | None:
    """The local shard of an FSDP2 parameter sharded along dim 0 over a 1-D mesh, else None."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor) or param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        return None
    return param.to_local()


def gather_full_state(model, bucket_bytes: int) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict (every rank gets it) from flat bucketed all-gathers, or None when some
    parameter is not a dim-0 shard (then use torch's get_model_state_dict).

    Rank r's shard of a parameter is rows [start_r, start_r + n_r) of it; the rows each rank holds
    are exchanged first (one small all-gather), then each bucket of parameters travels as one flat
    tensor per rank, padded to the longest rank's length. The keys are the model's state-dict
    keys, tied weights (`lm_head.weight`) and unsharded buffers included, as torch's gather gives.
    """
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
    all_rows = [r.cpu().tolist() for r in all_rows]
    out: dict[str, torch.Tensor] = {}
    bucket: list[int] = []
    size = 0
    for i, (_, p) in enumerate(params):
        bucket.append(i)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes or i == len(params) - 1:
            _gather_bucket(params, locals_, all_rows, bucket, world, out)
            bucket, size = [], 0
    return {
        key: out[by_id[id(t)]] if id(t) in by_id else t.detach().cpu().clone() for key, t in layout.items()
    }


def _gather_bucket(params, locals_, all_rows, bucket, world, out) -> None:
    dtype = locals_[bucket[0]].dtype
    if any(locals_[i].dtype != dtype for i in bucket):  # mixed dtypes: one bucket per parameter
        for i in bucket:
            _gather_bucket(params, locals_, all_rows, [i], world, out)
        return
    row_numel = [math.prod(params[i][1].shape[1:]) for i in bucket]
    lengths = [sum(all_rows[r][i] * n for i, n in zip(bucket, row_numel)) for r in range(world)]
    flat = torch.cat([locals_[i].reshape(-1) for i in bucket]) if lengths[dist.get_rank()] else locals_[bucket[0]].new_empty(0)
    flat = torch.nn.functional.pad(flat, (0, max(lengths) - flat.numel()))
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat.contiguous())
    parts = [t.cpu() for t in parts]
    offsets = [0] * world
    for i, n in zip(bucket, row_numel):
        name, p = params[i]
        pieces = []
        for r in range(world):
            k = all_rows[r][i] * n
            pieces.append(parts[r][offsets[r] : offsets[r] + k])
            offsets[r] += k
        out[name] = torch.cat(pieces).view(p.shape).clone()
