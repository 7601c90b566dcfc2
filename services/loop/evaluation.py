"""Held-out evaluation: avg@k at the eval temperature and unbiased pass@k at T=1."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from services.loop.steps import step_seed, verify

if TYPE_CHECKING:
    from services.loop.trainer import Trainer


def evaluate(trainer: "Trainer", after_steps: int) -> dict:
    """Held-out avg@k at the eval temperature and pass@k at T=1 (unbiased estimator)."""
    tc = trainer.cfg.trainer
    if not trainer.eval_items:
        return {}
    final = after_steps == tc.steps
    n_prompts = (tc.final_eval_prompts or tc.eval_prompts) if final else tc.eval_prompts
    items = trainer.eval_items[:n_prompts] if n_prompts else trainer.eval_items
    prompts = trainer.encoded(items)
    n = (tc.final_eval_samples or tc.eval_samples) if final else tc.eval_samples
    out: dict[str, float] = {}
    for temp, tag in ((tc.eval_temperature, "low"), (1.0, "t1")):
        samples = trainer.parts.rollout.generate(prompts, n, temp, step_seed(tc.seed, after_steps, 3 if tag == "low" else 4))
        trainer.decode(samples)
        verify(trainer.parts.reward, samples, after_steps, f"eval-{tag}")
        correct = correct_matrix(samples, len(items), n)
        if tag == "low":
            out[f"eval_avg@{n}"] = avg_at_k(correct)
        else:
            out.update({f"eval_pass@{k}": v for k, v in pass_at_powers(correct).items()})
    trainer.eval_log.append({"step": after_steps, **out})
    return out


def correct_matrix(samples: list, n_prompts: int, n: int) -> torch.Tensor:
    """[prompts, n] 1.0 where a sample's verdict is `correct` (samples prompt-major)."""
    return torch.tensor([s.outcome == "correct" for s in samples], dtype=torch.float32).view(n_prompts, n)


def pass_at_powers(correct: torch.Tensor) -> dict[int, float]:
    """Unbiased pass@k for k = 1, 2, 4, ... <= n, averaged over the prompts of a [prompts, n] matrix."""
    n = correct.shape[1]
    counts = correct.sum(1).long().tolist()
    out, k = {}, 1
    while k <= n:
        out[k] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
        k *= 2
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as a stable product.

    1 - prod_{i=n-c+1}^{n} (1 - k/i), summed in log space: exact to float precision for
    n in the thousands, where the binomials themselves overflow.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    log_fail = sum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return 1.0 - math.exp(log_fail)


def avg_at_k(correct: torch.Tensor) -> float:
    """avg@k: mean correctness over prompts × k samples ([P, k] of 0/1)."""
    if correct.numel() == 0:
        raise ValueError("avg@k of no samples")
    return float(correct.float().mean())
