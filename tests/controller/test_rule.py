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
