"""Which part of the entropy the controller holds (`controller.entropy_source`), and targets
relative to that signal's first value, with hand-worked numbers."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from controller.actor import SOURCES, ControllerCore, MemoryStore
from controller.client import PUBLISHED, LocalControllerClient, publish_entropy, read_source
from controller.rule import (ConstantTarget, CosineTarget, LinearTarget, PiecewiseTarget, PIRule, TargetSchedule, plan,
                             target_at)
from services.config import AEPOConfig, ControllerConfig, TrainConfig

# one step's measurements: the mean 0.5 splits into content 0.3 (+ 0.2 irrelevant); the top 20 %
# of tokens average 1.2
MEASURED = {"exact": 0.5, "sampled": 0.45, "content": 0.3, "forking": 1.2}
STATS = {"entropy": 0.5, "entropy_sampled_batch": 0.45, "reg_selected": 4,
         "token_entropy": {"irrelevant": 0.2, "content": 0.3, "forking": 1.2, "nonforking": 0.3}}


def core(source: str, target, store=None) -> ControllerCore:
    return ControllerCore(AEPOConfig(target=target), ControllerConfig(entropy_source=source), "run", store=store)


def test_every_config_source_is_published_and_known_to_the_controller():
    from typing import get_args

    assert set(get_args(ControllerConfig.model_fields["entropy_source"].annotation)) == set(PUBLISHED) == set(SOURCES)


def test_content_0_3_below_a_target_of_0_35_plans_up_though_the_mean_0_5_is_above_it():
    c = core("content", ConstantTarget(value=0.35))
    c.publish(0, MEASURED)
    p = c.plan(1)
    assert (p["direction"], p["entropy"], p["target"], p["temperature"]) == ("up", 0.3, 0.35, 1.2)
    assert core("exact", ConstantTarget(value=0.35)).plan(1)["direction"] == "up"  # (nothing observed yet)
    exact = core("exact", ConstantTarget(value=0.35))
    exact.publish(0, MEASURED)
    assert exact.plan(1)["direction"] == "down"  # the same step, controlled on the mean: 0.5 > 0.35


def test_forking_1_2_above_a_target_of_1_0_plans_down():
    c = core("forking", ConstantTarget(value=1.0))
    c.publish(0, MEASURED)
    p = c.plan(1)
    assert (p["direction"], p["entropy"], p["target"], p["temperature"], p["m"]) == ("down", 1.2, 1.0, 0.8, 30)
    assert set(c.state()["last"]) == set(MEASURED)  # every source is recorded, one decides


def test_publish_entropy_sends_every_source_the_step_measured():
    c = core("content", ConstantTarget(value=0.35))
    publish_entropy(LocalControllerClient(c), 0, STATS)
    assert {s: v["entropy"] for s, v in c.state()["last"].items()} == MEASURED
    # without reward-irrelevant tokens the learners report no content; no GRPO tokens: forking NaN
    bare = {**STATS, "token_entropy": {"forking": float("nan"), "nonforking": float("nan")}}
    e = core("exact", ConstantTarget(value=0.35))
    publish_entropy(LocalControllerClient(e), 0, bare)
    assert set(e.state()["last"]) == {"exact", "sampled"}
    assert read_source(bare, "content") is None and read_source(bare, "forking") is None
    assert read_source(STATS, "forking") == 1.2 and read_source({}, "exact") is None


def test_an_unmeasured_source_is_refused_at_the_first_step_naming_it_and_why():
    c = core("content", ConstantTarget(value=0.35))
    c.plan(0)
    with pytest.raises(ValueError, match=r"controller.entropy_source 'content' was not measured at step 0: the run "
                                         r"has no reward-irrelevant tokens.*Measured: exact, forking, sampled"):
        publish_entropy(LocalControllerClient(c), 0, {**STATS, "token_entropy": {"forking": 1.2, "nonforking": 0.3}})
    assert c.state()["last"] == {}  # nothing recorded: the controller never plans from another signal
    with pytest.raises(ValueError, match="'forking' was not measured at step 3: the step had no GRPO response tokens"):
        core("forking", ConstantTarget(value=1.0)).publish(3, {"exact": 0.5, "sampled": 0.4})


def test_content_without_irrelevant_tokens_is_a_config_error():
    with pytest.raises(ValidationError, match=r"entropy_source 'content' is not measured in this run.*"
                                              r"irrelevant_tokens is empty"):
        TrainConfig.model_validate({"controller": {"entropy_source": "content"},
                                    "learner": {"entropy_analysis": {"irrelevant_tokens": []}}})
    with pytest.raises(ValidationError, match="data.type 'file' has none by default"):
        TrainConfig.model_validate({"controller": {"entropy_source": "content"},
                                    "data": {"type": "file", "train_path": "train.jsonl"}})
    # the countdown toy's default (the space) and an explicit set measure it; forking needs no set
    assert TrainConfig.model_validate({"controller": {"entropy_source": "content"}}).controller.entropy_source == "content"
    TrainConfig.model_validate({"controller": {"entropy_source": "content"}, "learner": {"entropy_analysis": {
        "irrelevant_tokens": ["\n"]}}, "data": {"type": "file", "train_path": "train.jsonl"}})
    TrainConfig.model_validate({"controller": {"entropy_source": "forking"}, "data": {"type": "file", "train_path": "t.jsonl"}})


def test_a_relative_target_is_0_8_of_the_first_content_value_and_survives_state_and_restore():
    rel = ConstantTarget(value=0.8, relative=True)
    store = MemoryStore()
    c = core("content", rel, store=store)
    assert c.target(0) is None  # H0 unknown
    first = c.plan(0)
    assert (first["direction"], first["target"], first["entropy"]) == ("up", None, None)  # as any unobserved plan
    c.publish(0, MEASURED)
    assert c.target(1) == pytest.approx(0.24)  # 0.8 x 0.3
    p = c.plan(1)
    assert p["direction"] == "down" and p["target"] == pytest.approx(0.24)  # 0.3 > 0.24
    c.publish(1, {**MEASURED, "content": 0.2})  # a later value is no new base
    assert c.target(2) == pytest.approx(0.24) and c.plan(2)["direction"] == "up"  # 0.2 <= 0.24
    assert c.state()["target_base"] == {"source": "content", "step": 0, "entropy": 0.3}
    fresh = core("content", rel)
    fresh.restore(c.state())  # the checkpoint path
    assert fresh.target(7) == pytest.approx(0.24) and fresh.plan(2) == c.plan(2)
    again = core("content", rel, store=store)  # a restarted controller on its store (Redis)
    assert again.target(7) == pytest.approx(0.24)


def test_a_retried_first_step_rebases_and_a_changed_source_is_refused():
    c = core("exact", ConstantTarget(value=0.5, relative=True))
    c.publish(0, {"exact": 0.6, "sampled": 0.6})
    c.publish(0, {"exact": 0.4, "sampled": 0.4})  # step 0 again (a rollback to the start): its value is H0
    assert c.target(1) == pytest.approx(0.2)
    other = core("sampled", ConstantTarget(value=0.5, relative=True))
    other.restore(c.state())
    with pytest.raises(ValueError, match="measured on source 'exact'.*this run controls 'sampled'"):
        other.plan(1)
    absolute = core("sampled", ConstantTarget(value=0.5))
    absolute.restore(c.state())
    assert absolute.target(1) == 0.5  # an absolute target needs no base


def test_every_schedule_may_be_relative():
    h0 = 0.4
    assert [target_at(LinearTarget(start=1.0, end=0.5, steps=10, relative=True), k, h0) for k in (0, 5, 20)] == \
        pytest.approx([0.4, 0.3, 0.2])
    assert [target_at(CosineTarget(start=1.0, end=0.5, steps=10, relative=True), k, h0) for k in (0, 10)] == \
        pytest.approx([0.4, 0.2])
    piece = PiecewiseTarget(boundaries=[10], values=[1.0, 0.5], relative=True)
    assert [target_at(piece, k, h0) for k in (0, 10)] == pytest.approx([0.4, 0.2]) and target_at(piece, 0) is None
    assert target_at(ConstantTarget(value=0.3), 0, base=5.0) == 0.3  # an absolute schedule ignores H0


def test_an_absolute_schedule_dumps_as_before_and_a_relative_one_round_trips():
    adapter = TypeAdapter(TargetSchedule)
    assert ConstantTarget(value=0.3).model_dump(mode="json") == {"type": "constant", "value": 0.3}
    rel = adapter.validate_python({"type": "linear", "start": 1.0, "end": 0.8, "steps": 50, "relative": True})
    dumped = rel.model_dump(mode="json")
    assert dumped["relative"] is True and adapter.validate_python(dumped) == rel
    assert adapter.validate_python({"value": 0.8, "relative": True}).relative  # type defaults to constant
    # the controller actor is built from the algorithm's JSON dump: a relative target stays relative
    from services.config import AlgorithmConfig

    alg = AEPOConfig(target=ConstantTarget(value=0.8, relative=True))
    assert TypeAdapter(AlgorithmConfig).validate_python(alg.model_dump(mode="json")).target.relative
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "constant", "value": 0.8, "relative": "sometimes"})


def test_the_pi_rule_holds_its_integral_until_h0_is_known():
    rule = PIRule(kp=10.0, ki=1.0)
    rel = ConstantTarget(value=0.8, relative=True)
    p = plan(None, 0, rel, rule, integral=0.2)
    assert (p.target, p.integral, p.direction, p.weight) == (None, 0.2, "up", pytest.approx(0.2))
    q = plan(0.3, 1, rel, rule, integral=0.2, base=0.3)  # e = 0.24 - 0.3 = -0.06
    assert q.target == pytest.approx(0.24) and q.integral == pytest.approx(0.14)
    assert q.weight == pytest.approx(abs(10 * -0.06 + 0.14)) and q.direction == "down"
    with pytest.raises(ValueError, match="relative target needs H0"):
        plan(0.3, 1, rel, rule)


def _learner_stats(has_irrelevant: bool) -> dict:
    """The learners' own statistics (services/learner/stats.py) of a hand-made batch: 10 GRPO tokens
    with entropy 0.1 (8 of them) and 2.0 (2), each with 0.05 on reward-irrelevant choices."""
    import torch

    from services.config import EntropyAnalysisConfig
    from services.learner.batch import TrainBatch
    from services.learner.stats import entropy_stats

    batch = TrainBatch.from_sequences([[1, 2]] * 3, [[3, 4, 5, 6, 7]] * 3, [1.0, -1.0, 1.0], [False, False, True], 0)
    mask = batch.response_mask[:, 1:]
    grpo = (mask * (1 - batch.is_regularizer.float().unsqueeze(1))) > 0
    entropy = torch.full(mask.shape, 0.7)
    entropy[grpo] = torch.tensor([0.1] * 8 + [2.0] * 2)
    return entropy_stats(batch, -entropy, entropy, torch.full(mask.shape, 0.05), analysis=EntropyAnalysisConfig(),
                         vocab_size=16, has_irrelevant=has_irrelevant, all_reduce=lambda t: t)


def test_the_learners_stats_reach_the_controller_under_each_source():
    stats = _learner_stats(has_irrelevant=True)
    assert stats["entropy"] == pytest.approx(0.48)  # (8 x 0.1 + 2 x 2.0) / 10
    assert stats["token_entropy"]["content"] == pytest.approx(0.43) and stats["token_entropy"]["forking"] == pytest.approx(2.0)
    for source, value in (("exact", 0.48), ("content", 0.43), ("forking", 2.0)):
        c = core(source, ConstantTarget(value=0.5))
        publish_entropy(LocalControllerClient(c), 0, stats)
        p = c.plan(1)
        assert p["entropy"] == pytest.approx(value) and p["direction"] == ("down" if value > 0.5 else "up"), source
    without = _learner_stats(has_irrelevant=False)  # no token set: stats.py reports no content at all
    assert "content" not in without["token_entropy"]
    with pytest.raises(ValueError, match="'content' was not measured at step 0"):
        publish_entropy(LocalControllerClient(core("content", ConstantTarget(value=0.5))), 0, without)
