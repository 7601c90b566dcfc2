"""The controller's pure decision rule and target schedules (controller/rule.py)."""

import math

import pytest
from pydantic import TypeAdapter, ValidationError

from controller.rule import (
    BangBangRule,
    ConstantTarget,
    CosineTarget,
    LinearTarget,
    PiecewiseTarget,
    TargetSchedule,
    plan,
    target_at,
)

RULE = BangBangRule()  # T 1.2 / 0.8, m 60 / 30


def test_entropy_equal_to_target_goes_up_as_the_reference_does():
    p = plan(0.35, step=5, schedule=ConstantTarget(value=0.35), rule=RULE)
    assert (p.temperature, p.m, p.direction) == (1.2, 60, "up")


def test_entropy_above_target_goes_down_with_the_smaller_m():
    p = plan(0.3501, step=5, schedule=ConstantTarget(value=0.35), rule=RULE)
    assert (p.temperature, p.m, p.direction, p.target) == (0.8, 30, "down", 0.35)


def test_no_observation_yet_goes_up():
    p = plan(None, step=0, schedule=ConstantTarget(value=0.35), rule=RULE)
    assert (p.temperature, p.m, p.direction) == (1.2, 60, "up")
    assert "no entropy" in p.reason


def test_the_temperature_flips_when_entropy_crosses_the_target():
    temps = [plan(h, 0, ConstantTarget(value=0.4), RULE).temperature for h in (0.5, 0.41, 0.4, 0.2)]
    assert temps == [0.8, 0.8, 1.2, 1.2]


def test_a_non_finite_entropy_is_refused_rather_than_acted_on():
    with pytest.raises(ValueError, match="finite"):
        plan(math.nan, 0, ConstantTarget(), RULE)


def test_configured_temperatures_and_m_are_used():
    rule = BangBangRule(temperature_up=1.5, temperature_down=0.67, m_up=1024, m_down=512)
    assert plan(0.1, 0, ConstantTarget(value=0.6), rule).to_dict()["m"] == 1024
    assert plan(0.9, 0, ConstantTarget(value=0.6), rule).temperature == 0.67


def test_linear_schedule_at_known_steps():
    s = LinearTarget(start=0.5, end=0.3, steps=100)
    # 0.5 + (0.3 - 0.5) * s/100
    assert [target_at(s, k) for k in (0, 50, 100, 200)] == pytest.approx([0.5, 0.4, 0.3, 0.3])


def test_cosine_schedule_at_known_steps():
    s = CosineTarget(start=0.5, end=0.3, steps=100)
    # end + (start - end) * (1 + cos(pi * s/100)) / 2; at s=25: 0.3 + 0.2 * (1 + 0.70711)/2 = 0.470711
    assert [target_at(s, k) for k in (0, 25, 50, 100, 150)] == pytest.approx([0.5, 0.470711, 0.4, 0.3, 0.3], abs=1e-6)


def test_piecewise_schedule_switches_at_the_boundaries():
    s = PiecewiseTarget(boundaries=[10, 20], values=[0.5, 0.4, 0.3])
    assert [target_at(s, k) for k in (0, 9, 10, 19, 20, 1000)] == [0.5, 0.5, 0.4, 0.4, 0.3, 0.3]


def test_the_plan_follows_a_moving_target():
    s = LinearTarget(start=0.6, end=0.2, steps=10)
    assert plan(0.5, 0, s, RULE).direction == "up"  # H* = 0.6
    assert plan(0.5, 10, s, RULE).direction == "down"  # H* = 0.2


def test_schedules_parse_as_a_tagged_union_and_bad_ones_are_refused():
    ta = TypeAdapter(TargetSchedule)
    assert isinstance(ta.validate_python({"type": "cosine", "start": 0.5, "end": 0.2, "steps": 10}), CosineTarget)
    with pytest.raises(ValidationError, match="len\\(values\\)"):
        ta.validate_python({"type": "piecewise", "boundaries": [5], "values": [0.1]})
    with pytest.raises(ValidationError, match="strictly increasing"):
        ta.validate_python({"type": "piecewise", "boundaries": [5, 5], "values": [0.1, 0.2, 0.3]})
    with pytest.raises(ValidationError):
        ta.validate_python({"type": "constant", "value": -0.1})
    with pytest.raises(ValidationError):
        ta.validate_python({"type": "sawtooth"})


# ----------------------------------------------------------------------------- the PI rule

from controller.rule import PIRule, pi_step  # noqa: E402
from services.config import AEPOConfig  # noqa: E402

PI = PIRule(kp=10.0, ki=1.0, u_max=4.0, temperature_up=1.2, temperature_down=0.8, m_up=64, m_down=32)


def test_pi_by_hand_below_and_above_the_target():
    p = plan(0.30, 0, ConstantTarget(value=0.35), PI, integral=0.0)
    # e = 0.05: I = 0.05, u = 10 * 0.05 + 1 * 0.05 = 0.55 -> hot, advantage weight 0.55
    assert (p.direction, p.temperature, p.m) == ("up", 1.2, 64)
    assert p.weight == pytest.approx(0.55) and p.integral == pytest.approx(0.05)
    p = plan(0.45, 1, ConstantTarget(value=0.35), PI, integral=0.05)
    # e = -0.1: I = -0.05, u = -1.0 - 0.05 = -1.05 -> cold, weight 1.05
    assert (p.direction, p.temperature, p.m) == ("down", 0.8, 32)
    assert p.weight == pytest.approx(1.05) and p.integral == pytest.approx(-0.05)


def test_pi_saturates_and_does_not_wind_up():
    # e = 1: raw 10 + 1 = 11 > 4 in the error's direction -> the integral holds at 0, u = 4
    u, i = pi_step(1.0, 0.0, PI)
    assert u == 4.0 and i == 0.0
    # integral-only law: the integral itself is clamped to u_max / ki
    only_i = PIRule(kp=0.0, ki=1.0, u_max=4.0)
    assert pi_step(0.2, 3.9, only_i) == pytest.approx((4.0, 4.0))
    # after a long saturated push the output reverses as soon as the error does
    i = 0.0
    for _ in range(100):
        _, i = pi_step(1.0, i, PI)
    u, _ = pi_step(-0.05, i, PI)
    assert u < 0


def test_no_observation_yet_holds_the_integral():
    p = plan(None, 0, ConstantTarget(value=0.35), PI, integral=0.5)
    assert p.weight == pytest.approx(0.5) and p.integral == 0.5 and p.direction == "up"


def _closed_loop(rule, steps=300, drift=0.01, gain=0.01, h0=0.5, target=0.35):
    """A first-order plant: GRPO pulls entropy down by `drift` a step; the regularizer moves it
    by gain * u (u = +-weight by direction). Returns the trajectory."""
    h, integral, traj = h0, 0.0, []
    for step in range(steps):
        p = plan(h, step, ConstantTarget(value=target), rule, integral=integral)
        integral = p.integral if p.integral is not None else integral
        u = p.weight if p.direction == "up" else -p.weight
        h = h - drift + gain * u
        traj.append(h)
    return traj


def test_pi_removes_the_steady_error_the_bang_bang_rule_chatters_around():
    pi = _closed_loop(PIRule(kp=5.0, ki=0.5, u_max=4.0))
    assert max(abs(h - 0.35) for h in pi[-50:]) < 1e-3  # the integral finds u = drift / gain = 1
    bb = _closed_loop(BangBangRule())
    # bang-bang applies u = +-1: net -0.02 above the target, 0 below it -> it sits on the target
    # from below, but with a drift of 0.02 a step it cannot hold at all
    assert max(abs(h - 0.35) for h in bb[-50:]) < 0.011
    assert _closed_loop(BangBangRule(), drift=0.02)[-1] < 0.35 - 0.5
    assert abs(_closed_loop(PIRule(kp=5.0, ki=0.5, u_max=4.0), drift=0.02)[-1] - 0.35) < 1e-3


def test_pi_rule_parses_from_yaml_shaped_dicts():
    rule = TypeAdapter(AEPOConfig).validate_python({"rule": {"type": "pi", "kp": 3, "ki": 0.2, "u_max": 2}}).rule
    assert isinstance(rule, PIRule) and rule.kp == 3 and rule.u_max == 2
    with pytest.raises(ValidationError):
        TypeAdapter(AEPOConfig).validate_python({"rule": {"type": "pi", "u_max": 0}})


def test_pi_on_the_temperature_draws_at_e_to_the_u_with_weight_one():
    rule = PIRule(actuator="temperature", kp=4.0, ki=0.4, u_max=0.69)
    p = plan(0.50, 3, ConstantTarget(value=0.60), rule, integral=0.0)
    # e = 0.1: I = 0.1, u = 0.4 + 0.04 = 0.44 -> T = e^0.44
    assert p.temperature == pytest.approx(math.exp(0.44), rel=1e-5) and p.weight == 1.0 and p.direction == "up"
    p = plan(0.90, 3, ConstantTarget(value=0.30), rule, integral=0.0)
    assert p.temperature == pytest.approx(math.exp(-0.69), rel=1e-5) and p.direction == "down"  # saturated
