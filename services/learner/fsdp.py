"""Building the FSDP2 model and its optimizer, and the small facts about it the worker needs."""

from __future__ import annotations

from typing import Sequence

import math
import os
from typing import Callable

import torch

from services.config import LearnerConfig


def build_fsdp_model(model_path: str, cfg: LearnerConfig, device: torch.device, seed: int = 0):
    """Load the HF model in float32 and shard it with FSDP2: each decoder layer, then the root.

    On GPU, parameters are cast to bf16 for compute and gradients reduced in float32
    (MixedPrecisionPolicy). On CPU parameters, gradients and optimizer stay float32; with
    `cpu_compute` bfloat16 (or auto on an AMX CPU) the decoder layers run under bf16 autocast
    (services/model/precision.py). The root group holds the
    embedding and the (tied) lm_head together, so tying survives sharding; with `chunked_head` it is
    not resharded after its forward (services/learner/head.py reads the head's weight after it).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from services.model.tiny import load_causal_lm
    from services.model.precision import autocast_layers, decoder_layers, resolve_cpu_compute

    torch.manual_seed(seed)
    cpu_bf16 = device.type == "cpu" and resolve_cpu_compute(cfg.cpu_compute) == "bfloat16"
    # eager attention under bf16 autocast: SDPA's CPU kernel is slower in bf16 than eager's two matmuls
    model = load_causal_lm(model_path, dtype=torch.float32, device=str(device),
                           attn_implementation="eager" if cpu_bf16 else "sdpa")
    if cpu_bf16:
        autocast_layers(decoder_layers(model))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    hold = hold_full_params(cfg, device)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=not hold)
    # the chunked head reads the root's (embedding, head, norm) parameters after the model's
    # forward, and in the backward: the root stays unsharded until its post-backward (FSDP2's own
    # default for a root), then reshards; `reshard` after a forward with no backward
    fully_shard(model, mp_policy=mp, reshard_after_forward=False if cfg.chunked_head else not hold)
    return model


def hold_full_params(cfg: LearnerConfig, device: torch.device) -> bool:
    """`cfg.hold_full_params`, with None meaning: on CPU yes, on GPU no."""
    return device.type == "cpu" if cfg.hold_full_params is None else cfg.hold_full_params


def make_adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these tensors (CPU and CUDA, DTensors
    included): the same update as the per-tensor loop up to float rounding, and on the tiny model
    3 ms a step instead of 20."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether train mode would change the forward (then scoring needs its own eval-mode pass)."""
    if float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a DTensor under FSDP2; its full value is the global norm."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def token_ids(model_path: str, tokens: Sequence[str]) -> list[int]:
    """Ids of single-token strings in the model's vocabulary; a string that is not one token is an error."""
    if not tokens:
        return []
    from services.model.tiny import load_tokenizer

    vocab = load_tokenizer(model_path).get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(f"entropy_analysis.irrelevant_tokens not in the vocabulary as single tokens: {missing}")
    return sorted({int(vocab[t]) for t in tokens})


def sync_on_last(model, last: bool, hold: bool) -> None:
    """Gradient accumulation under FSDP2: reduce-scatter gradients once per optimizer step (on the
    last micro-batch), and with held parameters reshard only after that last backward."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        if hold:
            model.set_reshard_after_backward(last)


def reshard(model) -> None:
    """Back to the sharded parameters: a forward with no backward after it (scoring, a step with no
    loss tokens) leaves held parameters unsharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def optimizer_step(model, optimizer, grad_clip: float, sums: dict[str, float],
                   all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Clip, step (skipped on a non-finite norm), zero; returns `sums` summed over ranks plus the step's facts."""
    grad_norm = total_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    keys = list(sums)
    out = dict(zip(keys, all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()))
    finite = math.isfinite(grad_norm)
    out.update(grad_norm=grad_norm, optimizer_steps=1.0 if finite else 0.0, skipped_steps=0.0 if finite else 1.0,
               steps_counted=1.0)
    return out


def save_sharded(model, optimizer, path: str) -> None:
    """Sharded model + optimizer state with torch.distributed.checkpoint (every rank writes its shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def save_rank_state(path: str, rank: int, generator: torch.Generator) -> dict[str, int]:
    """This rank's RNGs beside its shards, then fsync of every file the rank wrote; returns
    {file name: bytes} of them (DCP names a rank's shards __<rank>_<n>.distcp; rank 0 also
    writes .metadata)."""
    from services.loop.durable import fsync_files

    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()}, os.path.join(path, f"rng_rank{rank}.pt"))
    mine = [f for f in os.listdir(path) if f.startswith(f"__{rank}_") or f == f"rng_rank{rank}.pt"
            or (rank == 0 and f == ".metadata")]
    return fsync_files(path, mine)


def load_rank_state(path: str, rank: int, generator: torch.Generator) -> None:
    """Restore what `save_rank_state` wrote; a rank without a file of its own (the world size
    changed) keeps its seeded generator."""
    rng = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng):
        saved = torch.load(rng)
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch"])


def load_sharded(model, optimizer, path: str) -> None:
    """Load what `save_sharded` wrote (same world size or not: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
