"""The Countdown toy task: three numbers 1-9 and a target, answered in two arithmetic steps.

Prompt `9,8,3>69|`, answer `9*8=72,72-3=69`. The first step combines two of the numbers, the
second combines its result with the third (either order); + - * and exact / only; every
intermediate is a non-negative integer. The reward (the reward server's `countdown` verifier)
is 1 iff each number is used once, each step's arithmetic is right and the last result is the
target; spaces are ignored.

Reward-irrelevant freedom: warm-start answers insert a space with probability `space_prob` at
each of 9 places (around each operator and `=`, after the `,`). Without such freedom AEPO had
nothing to regulate at toy scale (docs/design.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations

OPS = ("+", "-", "*", "/")


def _apply(a: int, op: str, b: int) -> int | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    return a // b if b != 0 and a % b == 0 else None


@dataclass(frozen=True)
class Step:
    """One arithmetic step `a op b = result` of a Countdown answer."""

    left: int
    op: str
    right: int
    result: int


@dataclass(frozen=True)
class Problem:
    """A Countdown problem: three numbers and a target reachable in two steps."""

    numbers: tuple[int, int, int]
    target: int

    @property
    def prompt(self) -> str:
        return ",".join(map(str, self.numbers)) + f">{self.target}|"

    @property
    def reference(self) -> dict:
        """The reward server's `countdown` reference (step format, each number exactly once)."""
        return {"numbers": list(self.numbers), "target": self.target, "use_all": True}

    @property
    def key(self) -> tuple:
        return (tuple(sorted(self.numbers)), self.target)


@lru_cache(maxsize=None)
def solutions(numbers: tuple[int, ...]) -> dict[int, tuple[tuple[Step, Step], ...]]:
    """Every two-step solution of three numbers, grouped by the value reached."""
    out: dict[int, list[tuple[Step, Step]]] = {}
    for a, b, c in set(permutations(numbers)):
        for op1 in OPS:
            r = _apply(a, op1, b)
            if r is None:
                continue
            for op2 in OPS:
                for left, right in ((r, c), (c, r)):
                    t = _apply(left, op2, right)
                    if t is None:
                        continue
                    out.setdefault(t, []).append((Step(a, op1, b, r), Step(left, op2, right, t)))
    return {t: tuple(sorted(set(v), key=str)) for t, v in out.items()}


def format_answer(steps: tuple[Step, Step], rng: random.Random | None = None, space_prob: float = 0.0) -> str:
    """`a op b=r,r op c=t`, with an optional space at each of the 9 places when rng is given."""

    def sp() -> str:
        return " " if rng is not None and rng.random() < space_prob else ""

    s1, s2 = steps
    first = f"{s1.left}{sp()}{s1.op}{sp()}{s1.right}{sp()}={sp()}{s1.result}"
    second = f"{s2.left}{sp()}{s2.op}{sp()}{s2.right}{sp()}={sp()}{s2.result}"
    return f"{first},{sp()}{second}"


def sample_problem(rng: random.Random, max_target: int = 99) -> Problem:
    """Three numbers uniform in 1-9 and a target drawn uniformly from those reachable in 1..max_target."""
    while True:
        numbers = tuple(rng.randint(1, 9) for _ in range(3))
        reachable = sorted(t for t in solutions(numbers) if 1 <= t <= max_target)
        if reachable:
            return Problem(numbers, rng.choice(reachable))


def make_splits(num_train: int, num_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out problems (no (sorted numbers, target) pair in both)."""
    rng = random.Random(seed)
    evals: list[Problem] = []
    seen: set[tuple] = set()
    while len(evals) < num_eval:
        p = sample_problem(rng)
        if p.key not in seen:
            seen.add(p.key)
            evals.append(p)
    train: list[Problem] = []
    attempts = 0
    while len(train) < num_train:
        attempts += 1
        if attempts > 100 * (num_train + 1000):
            raise ValueError(f"cannot draw {num_train} training problems disjoint from {num_eval} held-out ones")
        p = sample_problem(rng)
        if p.key not in seen:
            train.append(p)
    return train, evals


def warm_start_answer(problem: Problem, rng: random.Random, space_prob: float) -> str:
    """A uniformly random valid solution of `problem`, with random optional spaces."""
    return format_answer(rng.choice(solutions(problem.numbers)[problem.target]), rng, space_prob)
