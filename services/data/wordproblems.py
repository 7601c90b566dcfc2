"""Synthetic grade-school word problems whose reference solutions end in `\\boxed{N}`.

The LLM path's task: several templates (one and two arithmetic steps), names, items and number
ranges drawn from a seeded generator, so that a small model warm-started on the worked solutions
answers some correctly and some not, and the reward comes from the reward server's `math`
verifier (math-verify on the last `\\boxed{}`), exactly as for MATH or GSM8K. The reference is the
answer as text (`"31"`), what those datasets store.

    Tom has 3 boxes with 12 apples in each box. He gives away 5 apples. How many apples does he have left?
    3 * 12 = 36
    36 - 5 = 31
    The answer is \\boxed{31}.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

NAMES = (("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Ana", "she"), ("Sam", "he"), ("Lily", "she"),
         ("Omar", "he"), ("Zoe", "she"), ("Raj", "he"), ("Emma", "she"))
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "stamps", "cards", "shells")


@dataclass(frozen=True)
class WordProblem:
    """One problem: its text, the worked solution (ending in `\\boxed{answer}`) and the answer."""

    question: str
    solution: str
    answer: int


def _add(r: random.Random, hi: int, name: str, pr: str, item: str) -> WordProblem:
    a, b = r.randint(2, hi), r.randint(2, hi)
    q = f"{name} has {a} {item}. {pr.capitalize()} buys {b} more. How many {item} does {name} have now?"
    return WordProblem(q, f"{a} + {b} = {a + b}\nThe answer is \\boxed{{{a + b}}}.", a + b)


def _sub(r: random.Random, hi: int, name: str, pr: str, item: str) -> WordProblem:
    a = r.randint(3, hi)
    b = r.randint(1, a - 1)
    q = f"{name} had {a} {item} and gave {b} of them away. How many {item} does {pr} have left?"
    return WordProblem(q, f"{a} - {b} = {a - b}\nThe answer is \\boxed{{{a - b}}}.", a - b)


def _mul(r: random.Random, hi: int, name: str, pr: str, item: str) -> WordProblem:
    a, b = r.randint(2, 9), r.randint(2, max(2, hi // 2))
    q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {pr} have in all?"
    return WordProblem(q, f"{a} * {b} = {a * b}\nThe answer is \\boxed{{{a * b}}}.", a * b)


def _div(r: random.Random, hi: int, name: str, pr: str, item: str) -> WordProblem:
    b, each = r.randint(2, 9), r.randint(2, max(2, hi // 2))
    a = b * each
    q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
    return WordProblem(q, f"{a} / {b} = {each}\nThe answer is \\boxed{{{each}}}.", each)


def _mul_sub(r: random.Random, hi: int, name: str, pr: str, item: str) -> WordProblem:
    a, b = r.randint(2, 9), r.randint(2, max(2, hi // 2))
    c = r.randint(1, a * b - 1)
    q = (f"{name} buys {a} packs of {item} with {b} {item} in each pack. {pr.capitalize()} gives away {c} {item}. "
         f"How many {item} does {pr} have left?")
    return WordProblem(q, f"{a} * {b} = {a * b}\n{a * b} - {c} = {a * b - c}\nThe answer is \\boxed{{{a * b - c}}}.", a * b - c)


def _add_add(r: random.Random, hi: int, name: str, pr: str, item: str) -> WordProblem:
    a, b, c = r.randint(2, hi), r.randint(2, hi), r.randint(2, hi)
    q = (f"{name} has {a} {item}. On Monday {pr} finds {b} more and on Tuesday {c} more. "
         f"How many {item} does {pr} have now?")
    return WordProblem(q, f"{a} + {b} = {a + b}\n{a + b} + {c} = {a + b + c}\nThe answer is \\boxed{{{a + b + c}}}.", a + b + c)


TEMPLATES: tuple[Callable[..., WordProblem], ...] = (_add, _sub, _mul, _div, _mul_sub, _add_add)


def sample_problem(rng: random.Random, max_number: int = 50) -> WordProblem:
    """One problem from a random template, name, item and numbers up to `max_number`."""
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    return rng.choice(TEMPLATES)(rng, max_number, name, pronoun, item)


def make_splits(num_train: int, num_eval: int, seed: int, max_number: int = 50) -> tuple[list[WordProblem], list[WordProblem]]:
    """Disjoint train and held-out problems (no question text in both), deterministic in `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[WordProblem] = []
    attempts = 0
    while len(out) < num_train + num_eval:
        attempts += 1
        if attempts > 50 * (num_train + num_eval) + 1000:
            raise ValueError(f"only {len(out)} distinct problems with numbers up to {max_number}; ask for fewer")
        p = sample_problem(rng, max_number)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out[:num_train], out[num_train:]


def corpus(problems: list[WordProblem]) -> list[str]:
    """Text the tokenizer is trained on: every question and its worked solution."""
    return [t for p in problems for t in (p.question, p.solution)]
