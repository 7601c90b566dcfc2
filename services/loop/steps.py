"""Steps 4 and 5 of the loop as pure functions, and the metrics row a step writes.

No I/O beyond the reward call in `verify`: tested with fakes in tests/services/loop/test_trainer.py.
"""

from __future__ import annotations

from typing import Any

import torch

from services import algorithm as A
from services.config import AEPOConfig, TrainConfig
from services.contracts import RewardBackend, Sample
from services.learner.batch import TrainBatch


def verify(reward: RewardBackend, samples: list[Sample], step: int, kind: str) -> dict[str, int]:
    """Step 4 for one batch: fill reward/outcome in place; returns counts of timeout/error outcomes."""
    from reward_server.schemas import VerifyItem

    if not samples:
        return {}
    items = [VerifyItem(id=f"{step}-{kind}-{i}", task=s.prompt.task, response=s.text, reference=s.prompt.reference)
             for i, s in enumerate(samples)]
    results = reward.verify(items)
    if len(results) != len(samples):
        raise RuntimeError(f"reward server answered {len(results)} results for {len(samples)} items")
    failures = {"timeout": 0, "error": 0}
    for s, r in zip(samples, results):
        s.reward, s.outcome = float(r.reward), r.outcome
        if s.outcome in failures:  # scored 0, counted, never fatal
            failures[s.outcome] += 1
    return failures


def update_batch(rows: list[Sample], advantages: list[float], is_reg: list[bool], pad_id: int) -> TrainBatch:
    """The learners' batch, one row per sample of `rows` in order (`assemble` returns the rows
    beside it for the driver's logs)."""
    return TrainBatch.from_sequences([r.prompt_ids for r in rows], [r.response_ids for r in rows],
                                     [float(a) for a in advantages], [bool(x) for x in is_reg], pad_id)


def assemble(
    cfg: TrainConfig, grpo: list[Sample], reg: list[Sample], reg_m: int, pad_id: int, reg_weight: float = 1.0
) -> tuple[list[Sample], TrainBatch, dict]:
    """Step 5: advantages, regularizer selection and the update batch's layout.

    `reg_weight` scales the selected regularizer rows' advantages (the controller's plan: 1 for
    the paper's rule, the PI rule's |u| otherwise)."""
    G = cfg.rollout.group_size
    alg = cfg.algorithm
    adv = A.group_advantages(torch.tensor([s.reward for s in grpo], dtype=torch.float64), G)
    info: dict[str, Any] = {}
    if not isinstance(alg, AEPOConfig) or not reg:
        batch = update_batch(grpo, adv.tolist(), [False] * len(grpo), pad_id)
        return grpo, batch, {"reg_selected": 0 if isinstance(alg, AEPOConfig) else None}
    reg_rewards = torch.tensor([s.reward for s in reg], dtype=torch.float64)
    reg_adv = A.group_advantages(reg_rewards, G)
    signed = A.is_signed_regularizer(alg)
    idx, sel_adv = A.select_regularizer(reg_rewards, reg_adv, reg_m, alg.adv_threshold, signed=signed)
    keep = A.grpo_rows_kept(len(grpo), idx.numel(), alg.mode)
    rows = [reg[i] for i in idx.tolist()] + [grpo[i] for i in keep]
    advs = (sel_adv * reg_weight).tolist() + [float(adv[i]) for i in keep]
    flags = [True] * idx.numel() + [False] * len(keep)
    info["reg_selected"] = int(idx.numel())
    info["reg_positives_available"] = int(A.regularizer_candidates(reg_rewards, reg_adv, alg.adv_threshold, signed).sum())
    info["reg_share_of_batch"] = idx.numel() / max(1, len(rows))
    return rows, update_batch(rows, advs, flags, pad_id), info


def step_row(cfg: TrainConfig, step: int, policy_version: int, grpo: list[Sample], reg: list[Sample],
             plan: dict, sel: dict, stats: dict, failures: dict, timings: dict) -> dict:
    """One line of metrics.jsonl (before eval and timings): every name is the metric's field name."""
    reward_grpo, acc_grpo = batch_stats(grpo)
    reward_reg, acc_reg = batch_stats(reg)
    gen_tokens = sum(len(s.response_ids) for s in grpo + reg)
    learned = ("entropy", "entropy_sampled", "entropy_sampled_batch", "entropy_regularizer", "token_entropy",
               "entropy_irrelevant_share", "entropy_forking_share", "entropy_by_position")
    return {
        "step": step, "algorithm": cfg.algorithm.type, "policy_version": policy_version,
        **{k: stats.get(k) for k in learned},
        "entropy_target": plan.get("target"),  # only AEPO has a target, and it always plans
        "reg_temperature": plan.get("temperature"), "reg_m": plan.get("m"),
        "reg_direction": plan.get("direction"), "reg_weight": plan.get("weight"),
        **sel,
        "reward_mean": reward_grpo, "reward_mean_grpo": reward_grpo, "accuracy_grpo": acc_grpo,
        "reward_mean_regularizer": reward_reg, "accuracy_regularizer": acc_reg, "reward_failures": failures,
        "response_length_mean": gen_tokens / max(1, len(grpo) + len(reg)),
        "truncation_rate": sum(s.finish_reason == "length" for s in grpo + reg) / max(1, len(grpo) + len(reg)),
        "rollout_tokens_per_s": gen_tokens / max(timings["rollout"], 1e-9),
        **{k: stats[k] for k in ("pg_loss", "reg_loss", "clipfrac", "approx_kl", "grad_norm") if k in stats},
        "learner_tokens_per_s": stats.get("tokens_per_s"),
        "weight_sync_seconds": timings["weight_sync"],
    }


def batch_stats(samples: list[Sample]) -> tuple[float | None, float | None]:
    """(mean reward, accuracy) of a batch; accuracy counts outcome 'correct'."""
    if not samples:
        return None, None
    return (sum(s.reward for s in samples) / len(samples), sum(s.outcome == "correct" for s in samples) / len(samples))


def step_seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)
