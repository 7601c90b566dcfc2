"""The entropy controller's decision rule, pure: no Ray, no Redis, no I/O.

Paper (AEPO, Alg. 1): each step compares the policy entropy H with the target H*. If H <= H*
the regularizer batch is drawn at a high temperature (1.2), otherwise at a low one (0.8); the
correct, better-than-group samples of that batch get a REINFORCE update at T=1, which moves
entropy up (T>1) or down (T<1).

Reference code (597358816/AEPO, ray_trainer.fit): the same comparison with `<=`; before any
entropy is measured it holds entropy = 0, so the first step goes *up*; it keeps
min(m, #positives) samples going up and min(m, #positives) // 2 going down.

Here: the same bang-bang rule with T and m as configuration (m_up=60, m_down=30 by default,
i.e. the down count is configured rather than halved at run time); an unobserved entropy
plans "up", as the reference does; the target may follow any schedule over steps, which the
paper claims works but its code does not offer, and any schedule may be `relative`: its values
are then multiples of H0, the controlled signal's first observed value (step 0 of a fresh run),
so one config states "keep 80 % of the initial entropy" for models whose H0 differ. Before H0 is
known the target is None, which happens only where no entropy has been observed either, so the
plan is the unobserved one ("up"; the PI rule holds its integral), whatever the schedule.

Below them, rivals for a same-budget benchmark (Skywork-OR1's adaptive entropy coefficient,
EntroPIC's PI-weighted tokens): `decide` gives the levers the learners apply to the loss
(`services.algorithm.policy_loss(levers=...)`; algorithm types adaptive_entropy and entropic).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _type_or(default: str):
    """Discriminator that reads `type` and falls back to `default` when it is left out."""

    def pick(value) -> str:
        if isinstance(value, dict):
            return value.get("type", default)
        return getattr(value, "type", default)

    return Discriminator(pick)


class _Schedule(_Strict):
    """A target schedule's shared switch: its values in nats, or as multiples of H0."""

    # left out of a dump when false, so an absolute schedule dumps (and names its runs) as before
    relative: bool = Field(
        False, exclude_if=lambda v: not v,
        description="true: every value of the schedule is a multiple of H0, the controlled signal's first "
        "observed value (step 0), e.g. value 0.8 = 80 % of it; false: values in nats per token.",
    )


class ConstantTarget(_Schedule):
    """H*(step) = value (× H0 when relative)."""

    type: Literal["constant"] = "constant"
    value: float = Field(0.35, ge=0.0, description="Target entropy in nats per token (relative: a multiple of H0).")


class LinearTarget(_Schedule):
    """H* moves linearly from `start` (step 0) to `end` (step `steps`), then stays at `end`."""

    type: Literal["linear"] = "linear"
    start: float = Field(ge=0.0, description="Target at step 0, nats per token (relative: a multiple of H0).")
    end: float = Field(ge=0.0, description="Target from step `steps` on, nats per token (relative: a multiple of H0).")
    steps: int = Field(ge=1, description="Steps over which the target moves.")


class CosineTarget(_Schedule):
    """H* follows half a cosine from `start` (step 0) to `end` (step `steps`), then stays."""

    type: Literal["cosine"] = "cosine"
    start: float = Field(ge=0.0, description="Target at step 0, nats per token (relative: a multiple of H0).")
    end: float = Field(ge=0.0, description="Target from step `steps` on, nats per token (relative: a multiple of H0).")
    steps: int = Field(ge=1, description="Steps over which the target moves.")


class PiecewiseTarget(_Schedule):
    """H* = values[i] for boundaries[i-1] <= step < boundaries[i] (values has one more entry)."""

    type: Literal["piecewise"] = "piecewise"
    boundaries: list[int] = Field(description="Strictly increasing steps where the target changes.")
    values: list[float] = Field(description="Targets, one more than boundaries, nats per token (relative: multiples of H0).")

    @model_validator(mode="after")
    def _check(self) -> "PiecewiseTarget":
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"piecewise target needs len(values) == len(boundaries) + 1, "
                f"got {len(self.values)} values and {len(self.boundaries)} boundaries"
            )
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"piecewise boundaries must be strictly increasing, got {self.boundaries}")
        if any(v < 0 for v in self.values):
            raise ValueError(f"piecewise targets must be >= 0, got {self.values}")
        return self


TargetSchedule = Annotated[
    Union[
        Annotated[ConstantTarget, Tag("constant")],
        Annotated[LinearTarget, Tag("linear")],
        Annotated[CosineTarget, Tag("cosine")],
        Annotated[PiecewiseTarget, Tag("piecewise")],
    ],
    _type_or("constant"),
]


def target_at(schedule: TargetSchedule, step: int, base: float | None = None) -> float | None:
    """The target entropy H*(step) of a schedule, in nats. A relative schedule's value is scaled by
    `base` (H0, the controlled signal's first observed value) and is None while H0 is unknown."""
    value = _schedule_value(schedule, step)
    if not schedule.relative:
        return value
    return None if base is None else value * base


def _schedule_value(schedule: TargetSchedule, step: int) -> float:
    if isinstance(schedule, ConstantTarget):
        return schedule.value
    if isinstance(schedule, LinearTarget):
        frac = min(max(step, 0) / schedule.steps, 1.0)
        return schedule.start + (schedule.end - schedule.start) * frac
    if isinstance(schedule, CosineTarget):
        frac = min(max(step, 0) / schedule.steps, 1.0)
        return schedule.end + (schedule.start - schedule.end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if isinstance(schedule, PiecewiseTarget):
        return schedule.values[bisect.bisect_right(schedule.boundaries, step)]
    raise TypeError(f"unknown target schedule {schedule!r}")


class BangBangRule(_Strict):
    """The paper's rule: T_up and m_up when H <= H*, else T_down and m_down."""

    type: Literal["bang_bang"] = "bang_bang"
    temperature_up: float = Field(1.2, gt=0.0, le=2.0, description="Regularizer temperature when H <= H*.")
    temperature_down: float = Field(0.8, gt=0.0, le=2.0, description="Regularizer temperature when H > H*.")
    m_up: int = Field(60, ge=0, description="Most regularizer positives kept when raising entropy.")
    m_down: int = Field(30, ge=0, description="Most regularizer positives kept when lowering entropy.")


class PIRule(_Strict):
    """Beyond the paper: a PI law on the regularizer's signed strength u (anti-windup, bounded).

    With `actuator: temperature` u is instead log T of the regularizer batch: the rule draws it at
    T = e^u (hot when u > 0), every positive with advantage 1, and the integral finds the
    temperature whose positives balance GRPO's pull.


    e = H* − H (nats). The integral I accumulates e each step (clamped so that |ki·I| <= u_max,
    and frozen while the output is saturated in the direction e pushes: conditional integration).
    u = kp·e + ki·I, clamped to [−u_max, u_max]. u >= 0 draws the regularizer hot (T_up, m_up),
    u < 0 cold (T_down, m_down); the selected positives' advantage is |u| instead of 1, so |u|
    scales the REINFORCE term continuously (the paper's rule is u = ±1 always). The integral
    finds the steady strength that balances GRPO's own pull on entropy, which no fixed m or T
    knows in advance.
    """

    type: Literal["pi"] = "pi"
    temperature_up: float = Field(1.2, gt=0.0, le=2.0, description="Regularizer temperature when u >= 0.")
    temperature_down: float = Field(0.8, gt=0.0, le=2.0, description="Regularizer temperature when u < 0.")
    m_up: int = Field(64, ge=0, description="Most regularizer positives kept when raising entropy.")
    m_down: int = Field(32, ge=0, description="Most regularizer positives kept when lowering entropy.")
    actuator: Literal["weight", "temperature"] = Field(
        "weight",
        description="weight: u is the positives' advantage weight (sign picks T_up/T_down); temperature: u is "
        "log T of the regularizer batch (T = e^u, weight 1), so the temperature itself moves continuously.",
    )
    # Gains for the toy's measured plant: one unit of u moves entropy by g ≈ 0.0013 nats/step
    # (results/toy_claims). For e_{t+1} = e_t − g(kp e_t + ki I_t) the poles are real while
    # ki <= g kp² / 4 (≈ 0.5 at kp = 40); ki = 1 at kp = 10 (30× that) oscillated with a period of
    # ≈ 90 steps. Re-tune on another scale: measure g from a bang-bang run's slopes.
    kp: float = Field(40.0, ge=0.0, description="Proportional gain, u per nat of error.")
    ki: float = Field(0.3, ge=0.0, description="Integral gain, u per nat·step of accumulated error.")
    u_max: float = Field(4.0, gt=0.0, description="Bound on |u| (weight; or log T, e.g. 0.69 = T in [0.5, 2]).")


ControllerRule = Annotated[
    Union[Annotated[BangBangRule, Tag("bang_bang")], Annotated[PIRule, Tag("pi")]], _type_or("bang_bang")
]


@dataclass(frozen=True)
class Plan:
    """What the rollout service draws this step's regularizer batch with."""

    temperature: float
    m: int
    target: float | None  # None: a relative target before H0 is known (then nothing is observed either)
    direction: Literal["up", "down"]
    reason: str
    weight: float = 1.0  # the selected positives' advantage (1 = the paper's REINFORCE term)
    integral: float | None = None  # the PI rule's integral after this step (None for bang-bang)

    def to_dict(self) -> dict:
        return asdict(self)


def plan(
    entropy: float | None, step: int, schedule: TargetSchedule, rule: ControllerRule, integral: float = 0.0,
    base: float | None = None,
) -> Plan:
    """Decide the regularizer's temperature, size and weight from the last observed entropy.

    `entropy` is None before the learners have published one; the reference code starts
    from entropy 0 and so goes up first, and so do we. `integral` is the PI rule's integral
    before this step (ignored by bang-bang); the returned plan carries the updated one. `base`
    is H0 for a relative schedule: unknown (None) only before the first observation, when the
    plan is the unobserved one and its target None.
    """
    target = target_at(schedule, step, base)
    if entropy is not None and not math.isfinite(entropy):
        raise ValueError(f"observed entropy must be finite, got {entropy}")
    if entropy is not None and target is None:
        raise ValueError(f"a relative target needs H0, the controlled signal's first value, to plan from H={entropy:.4f}: "
                         "the controller's state has an observation but no base (a state from before relative targets)")
    if isinstance(rule, PIRule):
        return _pi_plan(entropy, target, rule, integral)
    if entropy is None:
        return Plan(rule.temperature_up, rule.m_up, target, "up", "no entropy observed yet: raise (as the reference)")
    if entropy <= target:
        return Plan(rule.temperature_up, rule.m_up, target, "up", f"H={entropy:.4f} <= H*={target:.4f}")
    return Plan(rule.temperature_down, rule.m_down, target, "down", f"H={entropy:.4f} > H*={target:.4f}")


def pi_step(error: float, integral: float, rule: PIRule) -> tuple[float, float]:
    """One PI update: (u, new integral) from the tracking error e = H* − H and the old integral."""
    i_max = rule.u_max / rule.ki if rule.ki > 0 else 0.0
    candidate = min(max(integral + error, -i_max), i_max)
    raw = rule.kp * error + rule.ki * candidate
    # conditional integration: while the output is saturated and the error pushes further into
    # saturation, the integral holds still (it would only have to unwind later: windup)
    if abs(raw) > rule.u_max and error * raw > 0:
        candidate = integral
        raw = rule.kp * error + rule.ki * candidate
    return min(max(raw, -rule.u_max), rule.u_max), candidate


def _pi_plan(entropy: float | None, target: float | None, rule: PIRule, integral: float) -> Plan:
    if entropy is None:
        u, new_i, why = rule.ki * integral, integral, "no entropy observed yet: hold the integral"
    else:
        u, new_i = pi_step(target - entropy, integral, rule)
        why = f"H={entropy:.4f}, H*={target:.4f}: u={u:+.3f} (P {rule.kp * (target - entropy):+.3f}, I {rule.ki * new_i:+.3f})"
    if rule.actuator == "temperature":
        temperature = round(math.exp(u), 6)
        m = rule.m_up if u >= 0 else rule.m_down
        return Plan(temperature, m, target, "up" if u >= 0 else "down", why + f", T={temperature:.3f}", integral=new_i)
    if u >= 0:
        return Plan(rule.temperature_up, rule.m_up, target, "up", why, weight=u, integral=new_i)
    return Plan(rule.temperature_down, rule.m_down, target, "down", why, weight=-u, integral=new_i)


# ----------------------------------------------------------------------------- rival rules
# Rivals to AEPO's controller for a same-budget benchmark, pure like the rules above: `decide`
# maps (rule, last entropy, step, target, state) to a decision the learner applies and a new
# JSON state the controller persists. Every decision has the same keys, so the learners apply any
# rival blindly (services.algorithm.policy_loss): the loss gains −entropy_coef·H, and tokens whose
# probability exceeds prob_threshold get their policy-gradient term scaled by positive_weight
# (advantage > 0) or negative_weight (advantage < 0); a rival that does not use a lever leaves it
# neutral (coefficient 0, weights 1).


class SkyworkAdaptiveRule(_Strict):
    """Skywork-OR1's adaptive entropy control: a bang-bang ramp on an entropy-bonus coefficient.

    The loss gains −c·H. After each step's entropy H: α ← clip(α + Δ if H < H* else α − Δ,
    α_min, α_max), and the next step applies c = α if H < H* else 0, so the bonus is one-sided:
    it only ever raises entropy (the reference's `EntController`: strict `<`, bonus gated by the
    same comparison; before any entropy it applies α_0). Defaults: TRL's GRPOConfig
    (`use_adaptive_entropy`: Δ 0.005, α in [0, 1], α_0 = 0, target 0.2); Skywork's released
    training scripts use Δ = 1e-4, α_max = 0.005, target 0.2. The target comes from the shared
    schedule (`algorithm.target`), so every rule chases the same H*.
    """

    type: Literal["skywork_adaptive"] = "skywork_adaptive"
    coef_init: float = Field(0.0, ge=0.0, description="α_0, the coefficient before any entropy is seen.")
    coef_delta: float = Field(0.005, gt=0.0, description="Δ, the coefficient's change per step.")
    coef_min: float = Field(0.0, ge=0.0, description="Lower clip of α (>= 0: the bonus never turns into a penalty).")
    coef_max: float = Field(1.0, gt=0.0, description="Upper clip of α (Skywork's scripts: 0.005 with Δ = 1e-4).")

    @model_validator(mode="after")
    def _check(self) -> "SkyworkAdaptiveRule":
        if not self.coef_min <= self.coef_init <= self.coef_max:
            raise ValueError(f"need coef_min <= coef_init <= coef_max, "
                             f"got {self.coef_min}, {self.coef_init}, {self.coef_max}")
        return self


class EntroPICRule(_Strict):
    """EntroPIC (arXiv 2511.15248): a PI law that reweights confident positive and negative tokens.

    e = H − H* (note: the opposite sign of `PIRule`'s error). α_t = clip(kp·e_t + ki·I_{t−1},
    −α_max, α_max), then I_t = I_{t−1} + e_t: the integral term uses the errors *before* this
    step's, and the integral is never clamped (the reference clips only α: no anti-windup).
    Tokens with π(token) > prob_threshold are weighted 1 + α when their advantage is positive and
    1 − α when negative: α < 0 (entropy below target) softens confident positives and sharpens
    confident negatives, which raises entropy; α > 0 does the opposite. Reference loss
    (yk7333/EntroPIC core_algos.compute_policy_loss_entropic): the PPO loss plus
    α·mean over those tokens of (−ratio·|A|), a mean over the confident tokens only.
    Defaults: run_entropic.sh / config/entropic.yaml (kp 1, ki 0.01), dp_actor.py (α in [−1, 1]),
    the loss's `high_prob_thresh` 0.95. The reference reads H from the batch it is updating; a
    controller here reads the last published entropy, one step older.
    """

    type: Literal["entropic_pi"] = "entropic_pi"
    kp: float = Field(1.0, ge=0.0, description="Proportional gain, α per nat of H − H*.")
    ki: float = Field(0.01, ge=0.0, description="Integral gain, α per nat·step of accumulated H − H*.")
    alpha_max: float = Field(1.0, gt=0.0, le=1.0, description="Bound on |α| (<= 1 keeps both weights >= 0).")
    prob_threshold: float = Field(0.95, gt=0.0, lt=1.0, description="Tokens with π above this get the weights.")


RivalRule = Annotated[Union[SkyworkAdaptiveRule, EntroPICRule], Field(discriminator="type")]

_STATE_KEY = {"skywork_adaptive": "coef", "entropic_pi": "integral"}


def initial_rival_state(rule: RivalRule) -> dict:
    """The state before the first step: {rule, step: None, coef α_0 | integral 0}."""
    if isinstance(rule, SkyworkAdaptiveRule):
        return {"rule": rule.type, "step": None, "coef": rule.coef_init}
    if isinstance(rule, EntroPICRule):
        return {"rule": rule.type, "step": None, "integral": 0.0}
    raise TypeError(f"unknown rival rule {rule!r}")


def entropic_step(error: float, integral: float, rule: EntroPICRule) -> tuple[float, float]:
    """One EntroPIC update: (α, new integral) from e = H − H* and the integral before this step."""
    raw = rule.kp * error + rule.ki * integral
    return min(max(raw, -rule.alpha_max), rule.alpha_max), integral + error


def decide(
    rule: RivalRule, entropy: float | None, step: int, target: float, state: dict | None = None
) -> tuple[dict, dict]:
    """A rival rule's decision for `step` and its new state, from the last observed entropy.

    `state` is what the previous call returned (None: `initial_rival_state`). A state that already
    covers `step` is refused: a retried step must start from the state before it, as the PI
    rule's integral does, so no step is counted twice. Both dicts are JSON-serialisable.
    """
    state = initial_rival_state(rule) if state is None else state
    value = _check_rival_inputs(rule, entropy, step, target, state)
    if isinstance(rule, SkyworkAdaptiveRule):
        levers, new_value = _skywork(rule, entropy, target, value)
    else:
        levers, new_value = _entropic(rule, entropy, target, value)
    seen = None if entropy is None else float(entropy)
    decision = {"rule": rule.type, "step": int(step), "target": float(target), "entropy": seen, **levers}
    return decision, {"rule": rule.type, "step": int(step), _STATE_KEY[rule.type]: new_value}


def _check_rival_inputs(rule: RivalRule, entropy: float | None, step: int, target: float, state: dict) -> float:
    if state.get("rule") != rule.type:
        raise ValueError(f"state belongs to rule {state.get('rule')!r}, not {rule.type!r}")
    if state.get("step") is not None and step <= state["step"]:
        raise ValueError(f"state already covers step {state['step']}; decide step {step} from the state before it")
    if entropy is not None and not (math.isfinite(entropy) and entropy >= 0):
        raise ValueError(f"observed entropy must be finite and >= 0, got {entropy}")
    if not (math.isfinite(target) and target >= 0):
        raise ValueError(f"target entropy must be finite and >= 0, got {target}")
    value = float(state[_STATE_KEY[rule.type]])
    if not math.isfinite(value):
        raise ValueError(f"state value {_STATE_KEY[rule.type]} must be finite, got {value}")
    return value


def _levers(direction: str, alpha: float, reason: str, coef: float = 0.0, w_pos: float = 1.0,
            w_neg: float = 1.0, threshold: float | None = None) -> dict:
    return {"direction": direction, "alpha": alpha, "entropy_coef": coef, "positive_weight": w_pos,
            "negative_weight": w_neg, "prob_threshold": threshold, "reason": reason}


def _skywork(rule: SkyworkAdaptiveRule, entropy: float | None, target: float, coef: float) -> tuple[dict, float]:
    if entropy is None:
        why = "no entropy observed yet: hold α and apply it (the reference starts with the bonus on)"
        return _levers("up" if coef > 0 else "none", coef, why, coef=coef), coef
    below = entropy < target
    coef = min(max(coef + (rule.coef_delta if below else -rule.coef_delta), rule.coef_min), rule.coef_max)
    applied = coef if below else 0.0
    why = f"H={entropy:.4f} {'<' if below else '>='} H*={target:.4f}: α={coef:.4f}, bonus {'on' if below else 'off'}"
    return _levers("up" if applied > 0 else "none", coef, why, coef=applied), coef


def _entropic(rule: EntroPICRule, entropy: float | None, target: float, integral: float) -> tuple[dict, float]:
    if entropy is None:
        alpha, new_i = min(max(rule.ki * integral, -rule.alpha_max), rule.alpha_max), integral
        why = "no entropy observed yet: hold the integral"
    else:
        alpha, new_i = entropic_step(entropy - target, integral, rule)
        why = (f"H={entropy:.4f}, H*={target:.4f}: α={alpha:+.4f} "
               f"(P {rule.kp * (entropy - target):+.4f}, I {rule.ki * integral:+.4f})")
    direction = "up" if alpha < 0 else "down" if alpha > 0 else "none"
    return _levers(direction, alpha, why, w_pos=1.0 + alpha, w_neg=1.0 - alpha, threshold=rule.prob_threshold), new_i
