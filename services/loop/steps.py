"""Steps 4 and 5 of the loop as pure functions, and the metrics row a step writes.

No I/O beyond the reward calls in `verify`: tested with fakes in tests/services/loop/test_trainer.py
and tests/services/loop/test_steps.py.

A `timeout` or `error` outcome is the reward server failing, not a verdict on the answer. `verify`
asks once more for those items; what still fails is, under `reward.on_failure: mask` (default),
left out of the update and of its group's advantage statistics (`assemble`), and a step where
more than `reward.max_failure_share` of the items still fail stops the run (`RewardFailureError`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from controller.client import read_source
from services import algorithm as A
from services.config import AEPOConfig, RewardConfig, TrainConfig
from services.contracts import RewardBackend, Sample
from services.learner.batch import TrainBatch

FAILED_OUTCOMES = ("timeout", "error")  # the verifier's failure, not the answer's: no verdict


class RewardFailureError(RuntimeError):
    """Too many of a step's samples have no verdict (still `timeout`/`error` after the
    re-verification) to train on them; raised by `assemble` before the update, so the step
    leaves no trace and a resume repeats it."""


def has_verdict(s: Sample) -> bool:
    """False for a sample whose verification timed out or errored (its reward 0 is no verdict)."""
    return s.outcome not in FAILED_OUTCOMES


def verify(reward: RewardBackend, samples: list[Sample], step: int, kind: str) -> dict[str, int]:
    """Step 4 for one batch: fill reward/outcome in place.

    Items answered `timeout` or `error` are verified once more, in one batched call of only those
    items under fresh ids (`<step>-<kind>-<i>-retry`: a retry is a new request, and the server's
    verdict cache never stores failures, so they are really re-run). Returns the counts still
    failing after that, {"timeout": n, "error": n}, and "reverified": how many were sent twice
    ({} for no samples). Eval uses it too: there a failure simply counts as not correct.
    """
    if not samples:
        return {}
    _verify_into(reward, samples, [f"{step}-{kind}-{i}" for i in range(len(samples))])
    retry = [i for i, s in enumerate(samples) if not has_verdict(s)]
    if retry:
        _verify_into(reward, [samples[i] for i in retry], [f"{step}-{kind}-{i}-retry" for i in retry])
    failures = {o: sum(s.outcome == o for s in samples) for o in FAILED_OUTCOMES}
    return {**failures, "reverified": len(retry)}


def _verify_into(reward: RewardBackend, samples: list[Sample], ids: list[str]) -> None:
    """One batched reward call; each sample's reward/outcome set from its verdict."""
    from reward_server.schemas import VerifyItem

    items = [VerifyItem(id=i, task=s.prompt.task, response=s.text, reference=s.prompt.reference)
             for i, s in zip(ids, samples)]
    results = reward.verify(items)
    if len(results) != len(samples):
        raise RuntimeError(f"reward server answered {len(results)} results for {len(samples)} items")
    for s, r in zip(samples, results):
        s.reward, s.outcome = float(r.reward), r.outcome


def check_failures(rc: RewardConfig, samples: list[Sample], step: int | None = None) -> None:
    """Raise RewardFailureError when more than `rc.max_failure_share` of `samples` have no verdict."""
    failed = sum(not has_verdict(s) for s in samples)
    if not samples or failed / len(samples) <= rc.max_failure_share:
        return
    counts = dict(sorted(Counter(s.outcome for s in samples).items()))
    raise RewardFailureError(
        f"{_where(step, samples)}: {failed} of {len(samples)} samples have no reward verdict after one re-verification "
        f"(outcomes {counts}; share {failed / len(samples):.1%} > reward.max_failure_share "
        f"{rc.max_failure_share}). Nothing of this step was trained on. The reward server is not keeping up "
        "or a verifier is failing: read its log and aepo_reward_items_total by outcome, then add workers or "
        "replicas or raise reward.timeout_s, and resume from the last checkpoint (--resume). "
        "reward.max_failure_share: 1.0 trains through failures (masked, or as 0 with reward.on_failure: zero)."
    )


def update_batch(rows: list[Sample], advantages: list[float], is_reg: list[bool], pad_id: int) -> TrainBatch:
    """The learners' batch, one row per sample of `rows` in order (`assemble` returns the rows
    beside it for the driver's logs)."""
    return TrainBatch.from_sequences([r.prompt_ids for r in rows], [r.response_ids for r in rows],
                                     [float(a) for a in advantages], [bool(x) for x in is_reg], pad_id)


def assemble(
    cfg: TrainConfig, grpo: list[Sample], reg: list[Sample], reg_m: int, pad_id: int, reg_weight: float = 1.0,
    step: int | None = None,
) -> tuple[list[Sample], TrainBatch, dict]:
    """Step 5: advantages, regularizer selection and the update batch's layout.

    `reg_weight` scales the selected regularizer rows' advantages (the controller's plan: 1 for
    the paper's rule, the PI rule's |u| otherwise). First the failure threshold
    (`check_failures`; `step` only names the step in its error). With `reward.on_failure: mask`
    a sample without a verdict is no row of the batch, its groups' mean and std are over the
    members with a verdict (`A.group_advantages(valid=...)`), the regularizer never selects it,
    and in replace mode the positives replace the first GRPO rows *with* a verdict. Members of
    a group left with one verdict stay at advantage 0, like an all-equal group: a real verdict
    with nothing to compare it to. Nothing masked: exactly the unmasked layout.
    """
    check_failures(cfg.reward, grpo + reg, step)
    G, alg = cfg.rollout.group_size, cfg.algorithm
    valid = _valid(grpo, cfg.reward)
    adv = A.group_advantages(torch.tensor([s.reward for s in grpo], dtype=torch.float64), G, valid=valid).tolist()
    trainable = [i for i, s in enumerate(grpo) if valid is None or has_verdict(s)]
    if not trainable:  # an empty update batch can be neither laid out nor trained on
        raise RewardFailureError(f"{_where(step, grpo)}: no GRPO sample has a reward verdict; nothing to train on "
                                 "(reward.max_failure_share lets every failure through)")
    info: dict[str, Any] = {}
    if not isinstance(alg, AEPOConfig) or not reg:
        rows = [grpo[i] for i in trainable]
        batch = update_batch(rows, [adv[i] for i in trainable], [False] * len(rows), pad_id)
        return rows, batch, {"reg_selected": 0 if isinstance(alg, AEPOConfig) else None}
    reg_rewards = torch.tensor([s.reward for s in reg], dtype=torch.float64)
    reg_valid = _valid(reg, cfg.reward)
    reg_adv = A.group_advantages(reg_rewards, G, valid=reg_valid)
    signed = A.is_signed_regularizer(alg)
    idx, sel_adv = A.select_regularizer(reg_rewards, reg_adv, reg_m, alg.adv_threshold, signed=signed, valid=reg_valid)
    keep = [trainable[i] for i in A.grpo_rows_kept(len(trainable), idx.numel(), alg.mode)]
    rows = [reg[i] for i in idx.tolist()] + [grpo[i] for i in keep]
    advs = (sel_adv * reg_weight).tolist() + [adv[i] for i in keep]
    flags = [True] * idx.numel() + [False] * len(keep)
    info["reg_selected"] = int(idx.numel())
    info["reg_positives_available"] = int(
        A.regularizer_candidates(reg_rewards, reg_adv, alg.adv_threshold, signed, reg_valid).sum())
    info["reg_share_of_batch"] = idx.numel() / max(1, len(rows))
    return rows, update_batch(rows, advs, flags, pad_id), info


def _where(step: int | None, samples: list[Sample]) -> str:
    """The step, for an error: `assemble`'s argument, else the policy version that drew the samples
    (the trainer's step and policy version move together)."""
    if step is not None or not samples:
        return f"step {step}"
    return f"the step drawn by policy version {samples[0].policy_version}"


def _valid(samples: list[Sample], rc: RewardConfig) -> torch.Tensor | None:
    """Which samples have a verdict, under `mask`; None under `zero` (a failure is reward 0)."""
    if rc.on_failure != "mask":
        return None
    return torch.tensor([has_verdict(s) for s in samples], dtype=torch.bool)


def step_row(cfg: TrainConfig, step: int, policy_version: int, grpo: list[Sample], reg: list[Sample],
             plan: dict, sel: dict, stats: dict, failures: dict, timings: dict) -> dict:
    """One line of metrics.jsonl (before eval and timings): every name is the metric's field name.

    `failures` is `verify`'s result: `reward_failures` keeps its outcome counts (after the
    re-verification), `reward_reverified` how many items were sent twice, `reward_masked` how
    many samples (both batches) were left out of the update for want of a verdict.
    `entropy_controlled` is this step's value of the signal the controller plans from
    (`entropy_source`, controller.entropy_source), the one `entropy_target` (absolute, nats) is for."""
    masking = cfg.reward.on_failure == "mask"
    reward_grpo, acc_grpo = batch_stats(grpo, masking)
    reward_reg, acc_reg = batch_stats(reg, masking)
    gen_tokens = sum(len(s.response_ids) for s in grpo + reg)
    learned = ("entropy", "entropy_sampled", "entropy_sampled_batch", "entropy_regularizer", "token_entropy",
               "entropy_irrelevant_share", "entropy_forking_share", "entropy_by_position")
    return {
        "step": step, "algorithm": cfg.algorithm.type, "policy_version": policy_version,
        **{k: stats.get(k) for k in learned},
        "entropy_source": cfg.controller.entropy_source,
        "entropy_controlled": read_source(stats, cfg.controller.entropy_source),
        "entropy_target": plan.get("target"),  # controlled algorithms; None for a relative target before H0 is known
        "reg_temperature": plan.get("temperature"), "reg_m": plan.get("m"),
        "reg_direction": plan.get("direction"), "reg_weight": plan.get("weight"),
        # a rival rule's levers (adaptive_entropy, entropic): what the loss applied this step
        **{k: plan[k] for k in ("entropy_coef", "positive_weight", "negative_weight") if k in plan},
        **sel,
        "reward_mean": reward_grpo, "reward_mean_grpo": reward_grpo, "accuracy_grpo": acc_grpo,
        "reward_mean_regularizer": reward_reg, "accuracy_regularizer": acc_reg,
        "reward_failures": {k: v for k, v in failures.items() if k in FAILED_OUTCOMES},
        "reward_reverified": failures.get("reverified", 0),
        "reward_masked": sum(not has_verdict(s) for s in grpo + reg) if masking else 0,
        "response_length_mean": gen_tokens / max(1, len(grpo) + len(reg)),
        "truncation_rate": sum(s.finish_reason == "length" for s in grpo + reg) / max(1, len(grpo) + len(reg)),
        "rollout_tokens_per_s": gen_tokens / max(timings["rollout"], 1e-9),
        **{k: stats[k] for k in ("pg_loss", "reg_loss", "entropy_bonus", "clipfrac", "approx_kl", "grad_norm") if k in stats},
        "learner_tokens_per_s": stats.get("tokens_per_s"),
        "weight_sync_seconds": timings["weight_sync"],
    }


def batch_stats(samples: list[Sample], exclude_failed: bool = False) -> tuple[float | None, float | None]:
    """(mean reward, accuracy) of a batch.

    The mean is over the rewards the update used: with `exclude_failed` (reward.on_failure: mask)
    a sample without a verdict is left out, as it has no reward (None when no sample has one);
    otherwise it counts as the 0 it was trained as. Accuracy is the share of *all* samples whose
    outcome is 'correct': a sample without a verdict is not known to be correct, and keeping every
    drawn sample in the denominator means a failing reward server can lower it but never lift it.
    """
    if not samples:
        return None, None
    judged = [s for s in samples if has_verdict(s)] if exclude_failed else samples
    mean = sum(s.reward for s in judged) / len(judged) if judged else None
    return mean, sum(s.outcome == "correct" for s in samples) / len(samples)


def step_seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)
