"""Rival rules inside the controller core: state across retried steps, restore, relative targets."""

import pytest

from controller.actor import ControllerCore
from controller.rule import ConstantTarget, EntroPICRule, SkyworkAdaptiveRule
from services.config import AdaptiveEntropyConfig, ControllerConfig, EntroPICConfig

SKY = AdaptiveEntropyConfig(target=ConstantTarget(value=0.4), rule=SkyworkAdaptiveRule(coef_delta=0.01, coef_max=0.02))


def test_skywork_ramps_its_coefficient_and_a_replanned_step_gives_the_same_levers():
    core = ControllerCore(SKY, ControllerConfig(), "run")
    first = core.plan(0)
    assert first["entropy_coef"] == 0.0 and first["entropy"] is None and first["target"] == 0.4
    core.observe(0, 0.30)
    assert core.plan(1)["entropy_coef"] == pytest.approx(0.01)  # 0.30 < 0.40: α 0 -> 0.01, on
    assert core.plan(1)["entropy_coef"] == pytest.approx(0.01)  # a retried step: from the state before it
    core.observe(1, 0.35)
    assert core.plan(2)["entropy_coef"] == pytest.approx(0.02)
    core.observe(2, 0.30)
    assert core.plan(3)["entropy_coef"] == pytest.approx(0.02)  # clipped at coef_max
    core.observe(3, 0.45)
    entry = core.plan(4)  # above the target: α 0.02 -> 0.01 and no bonus this step
    assert entry["entropy_coef"] == 0.0 and entry["alpha"] == pytest.approx(0.01) and entry["direction"] == "none"
    assert [e["step"] for e in core.state()["log"]] == [0, 1, 2, 3, 4]


def test_a_restored_controller_continues_the_rival_state_exactly():
    core = ControllerCore(SKY, ControllerConfig(), "run")
    for step, h in enumerate([0.3, 0.3, 0.5]):
        core.plan(step)
        core.observe(step, h)
    saved = core.state()
    expected = core.plan(3)
    other = ControllerCore(SKY, ControllerConfig(), "run")
    other.restore(saved)
    assert other.plan(3) == expected and expected["entropy_coef"] == 0.0 and expected["alpha"] == pytest.approx(0.01)


def test_entropic_follows_a_relative_target_from_the_first_observation():
    cfg = EntroPICConfig(target=ConstantTarget(value=0.5, relative=True), rule=EntroPICRule(kp=2.0, ki=0.0))
    core = ControllerCore(cfg, ControllerConfig(entropy_source="forking"), "run")
    first = core.plan(0)
    assert first["target"] is None and first["positive_weight"] == 1.0  # no H0 yet, no error
    core.publish(0, {"exact": 0.3, "forking": 1.2})
    entry = core.plan(1)  # H* = 0.5 × 1.2 = 0.6, e = 1.2 − 0.6: α = clip(2 × 0.6) = 1
    assert entry["target"] == pytest.approx(0.6) and entry["alpha"] == pytest.approx(1.0)
    assert (entry["positive_weight"], entry["negative_weight"]) == pytest.approx((2.0, 0.0))
    core.publish(1, {"exact": 0.3, "forking": 0.5})
    entry = core.plan(2)  # e = 0.5 − 0.6 = −0.1: α = −0.2, confident positives softened
    assert (entry["positive_weight"], entry["negative_weight"]) == pytest.approx((0.8, 1.2))
