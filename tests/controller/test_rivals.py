"""The rival entropy controllers (controller/rule.py: Skywork-OR1's adaptive coefficient, EntroPIC).

Expected values are worked by hand in the comments; each sequence threads the state one call
returns into the next call, as a controller would.
"""

import json
import math

import pytest
from pydantic import TypeAdapter, ValidationError

from controller.rule import (
    EntroPICRule,
    RivalRule,
    SkyworkAdaptiveRule,
    decide,
    entropic_step,
    initial_rival_state,
)

KEYS = {"rule", "step", "target", "entropy", "direction", "alpha", "entropy_coef", "positive_weight",
        "negative_weight", "prob_threshold", "reason"}


def _run(rule, entropies, target, state=None, first_step=0):
    """Decisions for consecutive steps, each from the state the previous one returned."""
    out = []
    for k, h in enumerate(entropies):
        d, state = decide(rule, h, first_step + k, target, state)
        out.append(d)
    return out, state


# ----------------------------------------------------------------------------- Skywork-OR1


def test_skywork_ramps_by_delta_below_target_and_backs_off_above_it():
    rule = SkyworkAdaptiveRule(coef_delta=0.005, coef_max=1.0)
    ds, state = _run(rule, [0.30, 0.30, 0.30, 0.40], target=0.35)
    # below: 0 + .005 = .005, .010, .015 (bonus on); above: .015 - .005 = .010, bonus off
    assert [d["alpha"] for d in ds] == pytest.approx([0.005, 0.010, 0.015, 0.010])
    assert [d["entropy_coef"] for d in ds] == pytest.approx([0.005, 0.010, 0.015, 0.0])
    assert [d["direction"] for d in ds] == ["up", "up", "up", "none"]
    assert state == {"rule": "skywork_adaptive", "step": 3, "coef": pytest.approx(0.010)}
    # it never touches the token weights
    assert all((d["positive_weight"], d["negative_weight"], d["prob_threshold"]) == (1.0, 1.0, None) for d in ds)


def test_skywork_clips_at_its_maximum_and_at_zero():
    rule = SkyworkAdaptiveRule(coef_delta=0.005, coef_max=0.012)
    ds, _ = _run(rule, [0.1, 0.1, 0.1, 0.1], target=0.2)
    # .005, .010, min(.015, .012) = .012, stays .012
    assert [d["entropy_coef"] for d in ds] == pytest.approx([0.005, 0.010, 0.012, 0.012])
    start = {"rule": "skywork_adaptive", "step": 7, "coef": 0.003}
    ds, state = _run(rule, [0.5, 0.5], target=0.2, state=start, first_step=8)
    # .003 - .005 -> 0 (not -.002); 0 - .005 -> 0
    assert [d["alpha"] for d in ds] == [0.0, 0.0] and state["coef"] == 0.0


def test_skywork_is_one_sided_and_strict_at_the_target():
    rule = SkyworkAdaptiveRule()
    # H == H*: the reference compares with a strict `<`, so the coefficient goes down, bonus off
    d, state = decide(rule, 0.2, 5, 0.2, {"rule": "skywork_adaptive", "step": 4, "coef": 0.02})
    assert d["alpha"] == pytest.approx(0.015) and d["entropy_coef"] == 0.0
    # however the entropy wanders, the applied coefficient is never negative
    walk = [0.05 + 0.3 * abs(math.sin(1.7 * k)) for k in range(200)]
    ds, _ = _run(rule, walk, target=0.2)
    assert min(d["entropy_coef"] for d in ds) == 0.0 and max(d["entropy_coef"] for d in ds) > 0


def test_skywork_before_any_entropy_holds_and_applies_the_initial_coefficient():
    rule = SkyworkAdaptiveRule(coef_init=0.002)
    d, state = decide(rule, None, 0, 0.2)
    assert (d["alpha"], d["entropy_coef"], d["direction"]) == (0.002, 0.002, "up") and state["coef"] == 0.002
    assert "no entropy" in d["reason"]


def test_skywork_defaults_are_the_documented_ones():
    # TRL GRPOConfig: entropy_coef 0.0, entropy_coef_delta 0.005, entropy_coef_min 0.0, entropy_coef_max 1.0
    r = SkyworkAdaptiveRule()
    assert (r.coef_init, r.coef_delta, r.coef_min, r.coef_max) == (0.0, 0.005, 0.0, 1.0)


# ----------------------------------------------------------------------------- EntroPIC


def test_entropic_pi_by_hand():
    rule = EntroPICRule(kp=1.0, ki=0.01)
    ds, state = _run(rule, [0.30, 0.25, 0.05], target=0.10)
    # step 0: e = .30 - .10 = .20; α = 1*.20 + .01*0 = .2000; I = .20
    # step 1: e = .15;            α = .15 + .01*.20 = .1520; I = .35
    # step 2: e = -.05;           α = -.05 + .01*.35 = -.0465; I = .30
    assert [d["alpha"] for d in ds] == pytest.approx([0.2, 0.152, -0.0465])
    assert state["integral"] == pytest.approx(0.30)
    # weights on confident tokens: positives 1 + α, negatives 1 - α
    assert [d["positive_weight"] for d in ds] == pytest.approx([1.2, 1.152, 0.9535])
    assert [d["negative_weight"] for d in ds] == pytest.approx([0.8, 0.848, 1.0465])
    # too much entropy -> sharpen ("down"); too little -> soften positives ("up"); no entropy bonus
    assert [d["direction"] for d in ds] == ["down", "down", "up"]
    assert all(d["entropy_coef"] == 0.0 and d["prob_threshold"] == 0.95 for d in ds)


def test_entropic_clamps_alpha_but_not_the_integral_as_the_reference():
    rule = EntroPICRule(kp=10.0, ki=0.01, alpha_max=1.0)
    # e = .4: α = min(4.0, 1) = 1 -> positives 2, negatives 0; the integral still takes the .4
    d, state = decide(rule, 0.5, 0, 0.1)
    assert (d["alpha"], d["positive_weight"], d["negative_weight"]) == (1.0, 2.0, 0.0)
    assert state["integral"] == pytest.approx(0.4)
    # no anti-windup: 200 saturated steps leave I = 80, so a small negative error (α = -0.1 + 0.8)
    # still sharpens: the reference has to unwind its integral
    i = 0.0
    for _ in range(200):
        alpha, i = entropic_step(0.4, i, rule)
        assert alpha == 1.0
    assert i == pytest.approx(80.0)
    assert entropic_step(-0.01, i, rule)[0] == pytest.approx(0.7)


def test_entropic_before_any_entropy_holds_the_integral():
    rule = EntroPICRule(ki=0.5)
    d, state = decide(rule, None, 3, 0.2, {"rule": "entropic_pi", "step": 2, "integral": -0.4})
    # α = clip(0.5 * -0.4) = -0.2 -> raise entropy; integral unchanged
    assert d["alpha"] == pytest.approx(-0.2) and d["direction"] == "up" and state["integral"] == -0.4


def test_entropic_defaults_are_the_published_ones():
    # run_entropic.sh: entropy_control_p=1, entropy_control_i=0.01; dp_actor.py clips α to [-1, 1];
    # compute_policy_loss_entropic: high_prob_thresh=0.95
    r = EntroPICRule()
    assert (r.kp, r.ki, r.alpha_max, r.prob_threshold) == (1.0, 0.01, 1.0, 0.95)


def _closed_loop(rule, drift, steps=400, gain=0.05, h0=0.5, target=0.35):
    """A first-order plant: entropy moves by `drift` a step, the entropy bonus raises it by
    gain * entropy_coef * 20, and EntroPIC's α lowers it by gain * α (α > 0 sharpens)."""
    h, state, traj = h0, None, []
    for step in range(steps):
        d, state = decide(rule, h, step, target, state)
        h = max(h + drift + gain * 20 * d["entropy_coef"] - gain * d["alpha"] * (d["prob_threshold"] is not None), 0.0)
        traj.append(h)
    return traj


def test_closed_loop_entropic_holds_the_target_from_either_side_and_skywork_only_from_below():
    for drift in (-0.01, 0.01):
        assert max(abs(h - 0.35) for h in _closed_loop(EntroPICRule(kp=1.0, ki=0.05), drift)[-50:]) < 2e-3
    # a downward pull: the bonus ramps until it balances it and entropy stays near the target
    assert max(abs(h - 0.35) for h in _closed_loop(SkyworkAdaptiveRule(coef_delta=0.001), -0.01)[-100:]) < 0.02
    # an upward pull: a one-sided bonus can only switch off, so entropy runs away above the target
    assert _closed_loop(SkyworkAdaptiveRule(coef_delta=0.001), 0.01)[-1] > 0.35 + 3.0


# ----------------------------------------------------------------------------- the interface


def test_every_decision_has_the_same_keys_and_round_trips_through_json():
    for rule in (SkyworkAdaptiveRule(), EntroPICRule()):
        state = None
        for step, h in enumerate([None, 0.3, 0.1, 0.5]):
            d, state = decide(rule, h, step, 0.2, state)
            assert set(d) == KEYS and d["rule"] == rule.type and d["step"] == step
            assert json.loads(json.dumps(d)) == d
            state = json.loads(json.dumps(state))  # what a Redis store or a checkpoint hands back
        direct, _ = _run(rule, [None, 0.3, 0.1, 0.5], 0.2)
        assert d == direct[-1]


def test_rival_rules_parse_as_a_strict_tagged_union():
    ta = TypeAdapter(RivalRule)
    assert isinstance(ta.validate_python({"type": "skywork_adaptive", "coef_max": 0.005}), SkyworkAdaptiveRule)
    assert ta.validate_python({"type": "entropic_pi", "kp": 2, "ki": 0.1}).kp == 2
    bad = [
        {"type": "pi"},  # not a rival
        {"coef_delta": 0.01},  # the type is required
        {"type": "entropic_pi", "kd": 0.1},  # extra keys refused
        {"type": "entropic_pi", "alpha_max": 1.5},  # a weight would go negative
        {"type": "entropic_pi", "prob_threshold": 1.0},
        {"type": "skywork_adaptive", "coef_delta": 0.0},
        {"type": "skywork_adaptive", "coef_min": -0.1},
        {"type": "skywork_adaptive", "coef_init": 0.5, "coef_max": 0.1},
    ]
    for value in bad:
        with pytest.raises(ValidationError):
            ta.validate_python(value)


def test_states_that_would_count_a_step_twice_or_belong_elsewhere_are_refused():
    rule = SkyworkAdaptiveRule()
    _, after = decide(rule, 0.1, 4, 0.2)
    with pytest.raises(ValueError, match="already covers step 4"):
        decide(rule, 0.1, 4, 0.2, after)  # a retried step 4 must start from the state before it
    decide(rule, 0.1, 4, 0.2, initial_rival_state(rule))
    with pytest.raises(ValueError, match="belongs to rule"):
        decide(EntroPICRule(), 0.1, 5, 0.2, after)
    for h in (math.nan, math.inf, -0.1):
        with pytest.raises(ValueError, match="entropy"):
            decide(rule, h, 5, 0.2, after)
    with pytest.raises(ValueError, match="target"):
        decide(rule, 0.1, 5, math.nan, after)
