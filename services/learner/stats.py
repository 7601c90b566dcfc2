"""What the learner measures on a step: the entropy statistics and the update's summary.

`entropy_stats` is summed over ranks in one all-reduce; its names are the ones the metrics row,
Prometheus and the controller use (services/contracts.py lists them).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from services import algorithm as alg
from services.config import EntropyAnalysisConfig
from services.learner.batch import TrainBatch


def irrelevant_entropy(logits: torch.Tensor, irrelevant_ids: list[int], chunk_size: int) -> torch.Tensor:
    """The reward-irrelevant part of each position's entropy (zeros when there are no such tokens)."""
    if not irrelevant_ids:
        return torch.zeros(logits.shape[:2], device=logits.device)
    irr, _ = alg.entropy_split(logits, irrelevant_ids, 1.0, chunk_size)
    return irr.float()


def entropy_stats(
    batch: TrainBatch, old_logp: torch.Tensor, entropy: torch.Tensor, irrelevant: torch.Tensor, *,
    analysis: EntropyAnalysisConfig, vocab_size: int, has_irrelevant: bool, all_reduce: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
    """Exact token-mean entropy at T=1 of GRPO rows and of regularizer rows; sampled estimates
    (over the GRPO rows, and over the whole mixed update batch: the reference code's signal);
    the number of regularizer rows (`reg_selected`); and where the GRPO rows' entropy lives (`token_entropy`, `entropy_by_position`)."""
    ea = analysis
    mask = batch.response_mask[:, 1:]
    reg = batch.is_regularizer.unsqueeze(1).to(mask.dtype)
    grpo_mask, reg_mask = mask * (1 - reg), mask * reg
    sums = torch.stack([
        (entropy * grpo_mask).sum(), grpo_mask.sum(),
        (entropy * reg_mask).sum(), reg_mask.sum(),
        alg.sampled_entropy_estimate(old_logp, grpo_mask) * grpo_mask.sum(),
        alg.sampled_entropy_estimate(old_logp, mask) * mask.sum(), mask.sum(),
        (irrelevant * grpo_mask).sum(),
        batch.is_regularizer.sum().to(mask.dtype),
    ]).double().cpu()
    fork = alg.forking_split(entropy, grpo_mask, ea.forking_share, max_entropy=math.log(vocab_size))
    prof = alg.position_profile(entropy, grpo_mask, ea.position_bucket, ea.position_buckets)
    # one all-reduce for everything: the scalars, the histogram and the position profile
    packed = all_reduce(torch.cat([sums, fork.flatten(), prof.flatten()]))
    sums = packed[: len(sums)].tolist()
    fork = packed[len(sums) : len(sums) + fork.numel()].reshape(fork.shape)
    prof = packed[len(sums) + fork.numel() :].reshape(prof.shape)
    n_grpo = max(sums[1], 1.0)
    h = sums[0] / n_grpo
    kinds = alg.forking_stats(fork, ea.forking_share)
    token_entropy = {"forking": kinds["forking"], "nonforking": kinds["nonforking"]}
    if has_irrelevant:
        token_entropy.update(irrelevant=sums[7] / n_grpo, content=(sums[0] - sums[7]) / n_grpo)
    return {
        "entropy": h,
        "entropy_regularizer": sums[2] / sums[3] if sums[3] > 0 else float("nan"),
        "entropy_sampled": sums[4] / n_grpo,
        "entropy_sampled_batch": sums[5] / max(sums[6], 1.0),
        "grpo_tokens": sums[1],
        "reg_tokens": sums[3],
        "reg_selected": int(sums[8]),  # regularizer rows trained on (the controller logs it beside its plan)
        "token_entropy": token_entropy,
        "entropy_irrelevant_share": sums[7] / sums[0] if has_irrelevant and sums[0] > 0 else None,
        "entropy_forking_share": kinds["forking_entropy_share"],
        "entropy_by_position": [s / c if c > 0 else None for c, s in prof.T.tolist()],
    }


def finish_stats(totals: dict[str, float], mini_batches: int, elapsed: float) -> dict[str, float]:
    """Ratios from raw sums; losses and grad norm averaged over the optimizer steps taken."""
    counted = max(totals.get("steps_counted", 0.0), 1.0)
    grpo = totals.get("grpo_tokens", 0.0)
    return {
        "pg_loss": totals.get("pg_loss", 0.0) / counted,
        "reg_loss": totals.get("reg_loss", 0.0) / counted,
        "entropy_bonus": totals.get("entropy_bonus", 0.0) / counted,
        "clipfrac": totals.get("clipped_tokens", 0.0) / max(grpo, 1.0),
        "approx_kl": totals.get("approx_kl_sum", 0.0) / max(grpo, 1.0),
        "grad_norm": totals.get("grad_norm", 0.0) / counted,
        "optimizer_steps": totals.get("optimizer_steps", 0.0),
        "skipped_steps": totals.get("skipped_steps", 0.0),
        "tokens": totals.get("tokens", 0.0),
        "tokens_per_s": totals.get("tokens", 0.0) / max(elapsed, 1e-9),
        "update_s": elapsed,
    }
