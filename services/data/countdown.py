"""The Countdown toy task: n numbers 1-9 (3 by default, or 4) and a target, in n - 1 steps.

Prompt `9,8,3>69|`, answer `9*8=72,72-3=69`. The first step combines two of the numbers, each
next one combines the last result with an unused number (either order); + - * and exact / only;
every intermediate is a non-negative integer. The reward (the reward server's `countdown`
verifier) is 1 iff each number is used once, each step's arithmetic is right and the last result
is the target; spaces are ignored.

The harder variant (`num_numbers: 4`, `max_solutions`) asks for three steps and draws only
targets that few chains reach, so that finding one is a matter of exploring: the task on which
keeping entropy has something to win.

Reward-irrelevant freedom: warm-start answers insert a space with probability `space_prob` at
each of 4 places per step (around the operator and `=`) and after each `,`: 9 places with three
numbers. Without such freedom AEPO had nothing to regulate at toy scale (docs/design.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache, partial
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
    """A Countdown problem: numbers and a target reachable in len(numbers) - 1 steps."""

    numbers: tuple[int, ...]
    target: int
    max_solutions: int | None = field(default=None, compare=False)  # the rarity it was drawn under

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


Chain = tuple[Step, ...]


def _chains(numbers: tuple[int, ...]):
    """Every step chain using each number once: two numbers first, then the result with the next."""
    def extend(result: int, rest: tuple[int, ...], done: tuple[Step, ...]):
        if not rest:
            yield done
            return
        for i, c in enumerate(rest):
            for op in OPS:
                for left, right in ((result, c), (c, result)):
                    t = _apply(left, op, right)
                    if t is not None:
                        yield from extend(t, rest[:i] + rest[i + 1:], done + (Step(left, op, right, t),))

    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j:
                rest = tuple(x for k, x in enumerate(numbers) if k not in (i, j))
                for op in OPS:
                    r = _apply(a, op, b)
                    if r is not None:
                        yield from extend(r, rest, (Step(a, op, b, r),))


def solutions(numbers: tuple[int, ...], max_solutions: int | None = None) -> dict[int, tuple[Chain, ...]]:
    """Every solution chain of `numbers`, grouped by the value reached; with `max_solutions`, only
    the values that at most that many distinct chains reach (the rare targets)."""
    return _solutions(tuple(sorted(numbers)), max_solutions)


@lru_cache(maxsize=None)
def _solutions(numbers: tuple[int, ...], max_solutions: int | None) -> dict[int, tuple[Chain, ...]]:
    out: dict[int, set[Chain]] = {}
    for chain in _chains(numbers):
        out.setdefault(chain[-1].result, set()).add(chain)
    return {t: tuple(sorted(v, key=str)) for t, v in out.items() if max_solutions is None or len(v) <= max_solutions}


def format_answer(steps: Chain, rng: random.Random | None = None, space_prob: float = 0.0) -> str:
    """`a op b=r,r op c=t`, with an optional space at each of the 4 places per step and after each
    `,` when rng is given (drawn step by step, then comma by comma: the three-number toy's order)."""

    def sp() -> str:
        return " " if rng is not None and rng.random() < space_prob else ""

    parts = [f"{s.left}{sp()}{s.op}{sp()}{s.right}{sp()}={sp()}{s.result}" for s in steps]
    text = parts[0]
    for part in parts[1:]:
        text += f",{sp()}{part}"
    return text


def sample_problem(rng: random.Random, max_target: int = 99, num_numbers: int = 3,
                   max_solutions: int | None = None) -> Problem:
    """`num_numbers` numbers uniform in 1-9 and a target drawn uniformly from those reachable in
    1..max_target (by at most `max_solutions` chains, when given)."""
    while True:
        numbers = tuple(rng.randint(1, 9) for _ in range(num_numbers))
        reachable = sorted(t for t in solutions(numbers, max_solutions) if 1 <= t <= max_target)
        if reachable:
            return Problem(numbers, rng.choice(reachable), max_solutions)


def make_splits(num_train: int, num_eval: int, seed: int, num_numbers: int = 3,
                max_solutions: int | None = None) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out problems (no (sorted numbers, target) pair in both)."""
    rng = random.Random(seed)
    draw = partial(sample_problem, num_numbers=num_numbers, max_solutions=max_solutions)
    evals: list[Problem] = []
    seen: set[tuple] = set()
    while len(evals) < num_eval:
        p = draw(rng)
        if p.key not in seen:
            seen.add(p.key)
            evals.append(p)
    train: list[Problem] = []
    attempts = 0
    while len(train) < num_train:
        attempts += 1
        if attempts > 100 * (num_train + 1000):
            raise ValueError(f"cannot draw {num_train} training problems disjoint from {num_eval} held-out ones")
        p = draw(rng)
        if p.key not in seen:
            train.append(p)
    return train, evals


def warm_start_answer(problem: Problem, rng: random.Random, space_prob: float) -> str:
    """A uniformly random valid solution of `problem`, with random optional spaces."""
    return format_answer(rng.choice(solutions(problem.numbers, problem.max_solutions)[problem.target]), rng, space_prob)
