"""Steps 4-5 with reward outcomes that are not verdicts: re-verification, masking, the failure threshold
and the metrics row (services/loop/steps.py)."""

import math

import pytest
import torch

from reward_server.schemas import VerifyResult
from services.config import TrainConfig
from services.contracts import Sample
from services.data.datasets import PromptItem
from services.loop.steps import RewardFailureError, assemble, batch_stats, check_failures, step_row, verify

S2, S3 = math.sqrt(2), math.sqrt(3)


class ScriptedReward:
    """Answers by response text: 'good' correct, 'bad' incorrect, 'slow'/'crash' timeout/error on
    the first call only, 'dead' timeout on every call. Records the ids of each call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def verify(self, items):
        self.calls.append([it.id for it in items])
        out = []
        for it in items:
            outcome = {"good": "correct", "bad": "incorrect", "dead": "timeout"}.get(it.response)
            if outcome is None:
                first = len(self.calls) == 1
                outcome = ({"slow": "timeout", "crash": "error"}[it.response] if first else "correct")
            out.append(VerifyResult(id=it.id, reward=int(outcome == "correct"), outcome=outcome, detail="", elapsed_s=0.0))
        return out


def cfg_of(algorithm="grpo", mode="replace", **reward):
    alg = {"type": algorithm} if algorithm == "grpo" else {"type": algorithm, "mode": mode}
    return TrainConfig.model_validate({"algorithm": alg, "rollout": {"group_size": 4}, "reward": reward})


def sample(i, text="", reward=0.0, outcome="", version=0):
    item = PromptItem(f"p{i // 4}", f"q{i // 4}", "x", "exact")
    return Sample(item, [1, 2], [3 + i], "stop", 1.0, version, "fake", text=text, reward=reward, outcome=outcome)


def judged(outcomes, start=0):
    """Samples with verdicts already filled in: 1/0 correct/incorrect, 't'/'e' timeout/error."""
    names = {1: "correct", 0: "incorrect", "t": "timeout", "e": "error"}
    return [sample(start + i, reward=float(o == 1), outcome=names[o]) for i, o in enumerate(outcomes)]


def rows_of(batch):
    return [int(r[-1]) - 3 for r in batch.tokens.tolist()]  # the response token is 3 + the sample's index


# --------------------------------------------------------------------------- verify


def test_failed_items_are_verified_once_more_in_one_call_with_fresh_ids():
    reward = ScriptedReward()
    samples = [sample(i, t) for i, t in enumerate(["good", "slow", "bad", "crash", "dead", "good"])]
    counts = verify(reward, samples, 7, "all")
    assert reward.calls[0] == [f"7-all-{i}" for i in range(6)]
    assert reward.calls[1] == ["7-all-1-retry", "7-all-3-retry", "7-all-4-retry"]  # only the failures
    assert [s.outcome for s in samples] == ["correct", "correct", "incorrect", "correct", "timeout", "correct"]
    assert [s.reward for s in samples] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert counts == {"timeout": 1, "error": 0, "reverified": 3}  # what still fails after the retry


def test_a_clean_batch_is_verified_in_one_call():
    reward = ScriptedReward()
    counts = verify(reward, [sample(0, "good"), sample(1, "bad")], 0, "all")
    assert len(reward.calls) == 1 and counts == {"timeout": 0, "error": 0, "reverified": 0}
    assert verify(reward, [], 0, "all") == {} and len(reward.calls) == 1


# --------------------------------------------------------------------------- assemble: GRPO


def test_masking_drops_failed_rows_and_normalises_over_the_verdicts():
    # group 0 [1, 0, 0, timeout] -> over [1, 0, 0]: mean 1/3, unbiased std 1/sqrt(3): 2/sqrt(3), -1/sqrt(3)
    # group 1 [error, 1, 0, error] -> over [1, 0]: mean 1/2, std 1/sqrt(2): +-1/sqrt(2)
    grpo = judged([1, 0, 0, "t", "e", 1, 0, "e"])
    rows, batch, sel = assemble(cfg_of(max_failure_share=0.5), grpo, [], 0, pad_id=0)
    assert rows == [grpo[i] for i in (0, 1, 2, 5, 6)] and rows_of(batch) == [0, 1, 2, 5, 6]
    assert batch.advantages.tolist() == pytest.approx([2 / S3, -1 / S3, -1 / S3, 1 / S2, -1 / S2], abs=1e-5)
    assert sel == {"reg_selected": None}


def test_zero_mode_trains_on_failures_as_reward_zero_as_before():
    # [1, 0, 0, timeout] scored [1, 0, 0, 0]: mean 1/4, unbiased std 1/2 -> 1.5, -0.5, -0.5, -0.5
    grpo = judged([1, 0, 0, "t"])
    rows, batch, _ = assemble(cfg_of(on_failure="zero", max_failure_share=1.0), grpo, [], 0, pad_id=0)
    assert rows == grpo and batch.advantages.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)


def test_a_lone_verdict_stays_in_the_batch_at_advantage_zero():
    # [1, t, t, t]: one verdict, no baseline -> 0, like an all-equal group; [1, 0, 1, 0] -> +-sqrt(3)/2
    grpo = judged([1, "t", "t", "t", 1, 0, 1, 0])
    _, batch, _ = assemble(cfg_of(max_failure_share=0.5), grpo, [], 0, pad_id=0)
    assert rows_of(batch) == [0, 4, 5, 6, 7]
    assert batch.advantages.tolist() == pytest.approx([0, S3 / 2, -S3 / 2, S3 / 2, -S3 / 2], abs=1e-5)


# --------------------------------------------------------------------------- assemble: AEPO


def test_aepo_positives_replace_the_first_grpo_rows_that_have_a_verdict():
    # GRPO [t, 1, 0, 0 | 1, 0, 1, 0]; regularizer [e, 0, 0, 1]: over [0, 0, 1] the 1 has
    # mean 1/3, std 1/sqrt(3) -> 2/sqrt(3) > 0.05: selected (m = 1) with advantage 1 and replaces
    # GRPO row 1, the first with a verdict; row 0 has none and is in no row of the batch
    grpo = judged(["t", 1, 0, 0, 1, 0, 1, 0])
    reg = judged(["e", 0, 0, 1], start=8)
    rows, batch, sel = assemble(cfg_of("aepo"), grpo, reg, 1, pad_id=0)
    assert rows_of(batch) == [11, 2, 3, 4, 5, 6, 7] and batch.is_regularizer.tolist() == [True] + [False] * 6
    # GRPO group 0 over [1, 0, 0]: row 2 and 3 get -1/sqrt(3); group 1 [1, 0, 1, 0]: +-sqrt(3)/2
    want = [1.0, -1 / S3, -1 / S3, S3 / 2, -S3 / 2, S3 / 2, -S3 / 2]
    assert batch.advantages.tolist() == pytest.approx(want, abs=1e-5)
    assert sel["reg_selected"] == 1 and sel["reg_positives_available"] == 1


def test_the_signed_ablation_never_selects_a_failed_sample_and_its_group_excludes_it():
    # regularizer [1, 1, 0, timeout] over [1, 1, 0]: mean 2/3, std 1/sqrt(3) -> 1/sqrt(3), 1/sqrt(3), -2/sqrt(3)
    # (scored as 0 it would be [1, 1, 0, 0]: +-sqrt(3)/2, and the signed rule would pick the timeout)
    grpo = judged([1, 0, 1, 0, 1, 0, 0, 0])
    reg = judged([1, 1, 0, "t"], start=8)
    _, batch, sel = assemble(cfg_of("aepo_signed", "append"), grpo, reg, 10, pad_id=0)
    assert rows_of(batch)[:3] == [8, 9, 10] and sel["reg_selected"] == 3
    assert batch.advantages.tolist()[:3] == pytest.approx([1 / S3, 1 / S3, -2 / S3], abs=1e-5)
    _, zero, sel0 = assemble(cfg_of("aepo_signed", "append", on_failure="zero"), grpo, reg, 10, pad_id=0)
    assert rows_of(zero)[:4] == [8, 9, 10, 11] and sel0["reg_selected"] == 4  # the old behaviour picks it


def test_with_nothing_failed_masking_lays_out_exactly_the_old_batch():
    grpo, reg = judged([1, 0, 0, 0, 1, 1, 0, 1]), judged([1, 0, 1, 1], start=8)
    for alg in ("grpo", "aepo", "aepo_signed"):
        rows, batch, sel = assemble(cfg_of(alg), grpo, reg, 2, pad_id=0)
        rows0, batch0, sel0 = assemble(cfg_of(alg, on_failure="zero"), grpo, reg, 2, pad_id=0)
        assert rows == rows0 and sel == sel0 and torch.equal(batch.advantages, batch0.advantages)
        assert torch.equal(batch.tokens, batch0.tokens) and torch.equal(batch.is_regularizer, batch0.is_regularizer)


# --------------------------------------------------------------------------- the threshold


def test_a_step_over_the_failure_threshold_stops_with_counts_and_advice():
    samples = judged([1, 0, "t", "e"] + [1, 0, 0, 1] * 3 + [1, 0, "t", 0])  # 3 of 20 = 15 %
    check_failures(cfg_of().reward, samples, 7)  # 15 % <= 20 %: trains
    check_failures(cfg_of(max_failure_share=0.15).reward, samples, 7)  # exactly at the threshold: trains
    with pytest.raises(RewardFailureError) as err:
        check_failures(cfg_of(max_failure_share=0.1).reward, samples, 7)
    msg = str(err.value)
    for part in ("step 7", "3 of 20", "'timeout': 2", "'error': 1", "'correct': 8", "15.0% > reward.max_failure_share 0.1",
                 "reward.timeout_s", "--resume"):
        assert part in msg, part
    assert isinstance(err.value, RuntimeError)


def test_assemble_checks_the_threshold_over_both_batches_before_any_layout():
    grpo, reg = judged([1, 0, 1, 0] * 2), judged(["t", "t", "e", 1], start=8)  # 3 of 12 = 25 % > 20 %
    with pytest.raises(RewardFailureError, match="policy version 0"):  # no step given: named by its samples
        assemble(cfg_of("aepo"), grpo, reg, 4, pad_id=0)
    with pytest.raises(RewardFailureError, match="step 3:"):
        assemble(cfg_of("aepo"), grpo, reg, 4, pad_id=0, step=3)
    assemble(cfg_of("aepo", max_failure_share=0.25), grpo, reg, 4, pad_id=0)


def test_a_grpo_batch_without_any_verdict_cannot_be_trained_even_when_allowed():
    with pytest.raises(RewardFailureError, match="no GRPO sample has a reward verdict"):
        assemble(cfg_of(max_failure_share=1.0), judged(["t", "e", "t", "t"]), [], 0, pad_id=0)


# --------------------------------------------------------------------------- the metrics row


def test_the_row_counts_failures_and_means_only_the_rewards_trained_on():
    grpo = judged([1, 0, "t", 1])  # verdicts [1, 0, 1]: mean 2/3; correct 2 of 4 samples drawn
    timings = {"rollout": 1.0, "weight_sync": 0.1}
    failures = {"timeout": 1, "error": 0, "reverified": 3}
    row = step_row(cfg_of(), 0, 1, grpo, [], {}, {}, {}, failures, timings)
    assert row["reward_mean"] == pytest.approx(2 / 3) and row["accuracy_grpo"] == 0.5
    assert row["reward_failures"] == {"timeout": 1, "error": 0}
    assert row["reward_reverified"] == 3 and row["reward_masked"] == 1
    zero = step_row(cfg_of(on_failure="zero"), 0, 1, grpo, [], {}, {}, {}, failures, timings)
    assert zero["reward_mean"] == 0.5 and zero["accuracy_grpo"] == 0.5 and zero["reward_masked"] == 0


def test_batch_stats_of_a_batch_without_verdicts():
    assert batch_stats(judged(["t", "e"]), exclude_failed=True) == (None, 0.0)
    assert batch_stats(judged(["t", "e"])) == (0.0, 0.0)
    assert batch_stats([]) == (None, None)
