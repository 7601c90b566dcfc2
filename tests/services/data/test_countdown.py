"""The Countdown toy task generator (services/data/countdown.py)."""

import random
import re
from fractions import Fraction

import pytest

from services.data.countdown import Problem, format_answer, make_splits, sample_problem, solutions, warm_start_answer


def _check(answer: str, numbers, target) -> bool:
    """Independent checker: steps `a op b=c`, operands from the numbers or earlier results, once each."""
    pool = list(numbers)
    last = None
    for step in answer.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", step)
        if not m:
            return False
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        for x in (a, b):
            if x not in pool:
                return False
            pool.remove(x)
        val = {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b) if b else None}[op]
        if val != c:
            return False
        pool.append(c)
        last = c
    return last == target and len(pool) == 1


def test_the_example_from_the_task_description_is_a_solution():
    answers = {format_answer(s) for s in solutions((9, 8, 3))[69]}
    assert "9*8=72,72-3=69" in answers
    assert Problem((9, 8, 3), 69).prompt == "9,8,3>69|"


def test_every_enumerated_solution_passes_an_independent_checker():
    for numbers in [(9, 8, 3), (1, 1, 1), (7, 2, 6), (4, 4, 8)]:
        for target, sols in solutions(numbers).items():
            for s in sols:
                assert _check(format_answer(s), numbers, target), (numbers, target, s)


def test_brute_force_finds_no_solution_the_enumeration_missed():
    # every value reachable as (x op y) op z or z op (x op y) must be a key of solutions()
    numbers = (6, 3, 2)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: Fraction(a, b)}
    reach = set()
    for i, j, k in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]:
        for f in ops.values():
            r = f(numbers[i], numbers[j])
            if r < 0 or Fraction(r).denominator != 1:
                continue
            for g in ops.values():
                for a, b in ((r, numbers[k]), (numbers[k], r)):
                    if g is ops["/"] and b == 0:
                        continue
                    t = g(a, b)
                    if t >= 0 and Fraction(t).denominator == 1:
                        reach.add(int(t))
    assert reach == set(solutions(numbers))


def test_warm_start_answers_have_nine_optional_space_places():
    p = Problem((9, 8, 3), 69)
    rng = random.Random(0)
    assert warm_start_answer(p, rng, space_prob=1.0).count(" ") == 9
    assert " " not in warm_start_answer(p, rng, space_prob=0.0)
    for _ in range(50):
        assert _check(warm_start_answer(p, rng, 0.2), p.numbers, p.target)


def test_problems_have_targets_in_1_to_99_and_splits_are_disjoint():
    rng = random.Random(1)
    for _ in range(200):
        p = sample_problem(rng)
        assert 1 <= p.target <= 99 and all(1 <= n <= 9 for n in p.numbers)
        assert p.target in solutions(p.numbers)
    train, held_out = make_splits(2000, 100, seed=0)
    assert len(train) == 2000 and len(held_out) == 100
    assert not {p.key for p in train} & {p.key for p in held_out}


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_the_warm_starts_micro_batched_backward_is_the_plain_loss_and_gradient(tiny_model_path, micro_batches):
    """Length-sorted micro-batches, each cut to its own longest row: the same token-mean answer
    loss as the model's own `labels=` loss over the whole padded batch, and the same gradient."""
    import random

    import torch

    from services.data.countdown import make_splits
    from services.model.tiny import load_causal_lm, load_tokenizer
    from services.model.warmstart import sft_backward, sft_batch

    tok = load_tokenizer(tiny_model_path)
    train, _ = make_splits(200, 10, 0)
    ids, lab, att = sft_batch(train, tok, 12, random.Random(3), space_prob=0.5)
    assert len(set(att.sum(1).tolist())) > 2  # rows of several lengths
    model = load_causal_lm(tiny_model_path).train()
    want = model(input_ids=ids, attention_mask=att, labels=lab).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = sft_backward(model, ids, lab, att, micro_batches)
    assert got == pytest.approx(float(want), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[n], atol=1e-6, rtol=1e-4), n


def _brute_chains(numbers):
    """Every 3-step chain of 4 numbers, written out by nested loops (independent of `_chains`)."""
    from itertools import permutations

    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b if a >= b else None,
           "*": lambda a, b: a * b, "/": lambda a, b: a // b if b and a % b == 0 else None}
    out = {}
    for a, b, c, d in set(permutations(numbers)):
        for o1, f1 in ops.items():
            r1 = f1(a, b)
            if r1 is None:
                continue
            for o2, f2 in ops.items():
                for l2, q2 in ((r1, c), (c, r1)):
                    r2 = f2(l2, q2)
                    if r2 is None:
                        continue
                    for o3, f3 in ops.items():
                        for l3, q3 in ((r2, d), (d, r2)):
                            t = f3(l3, q3)
                            if t is not None:
                                out.setdefault(t, set()).add(f"{a}{o1}{b}={r1},{l2}{o2}{q2}={r2},{l3}{o3}{q3}={t}")
    return out


@pytest.mark.parametrize("numbers", [(9, 8, 3, 5), (1, 1, 2, 2), (7, 7, 1, 5), (6, 3, 9, 2)])
def test_four_number_chains_equal_a_brute_force_enumeration_and_pass_the_checker(numbers):
    brute = _brute_chains(numbers)
    ours = {t: {format_answer(c) for c in chains} for t, chains in solutions(numbers).items()}
    assert ours == brute
    for t, answers in ours.items():
        assert all(_check(a, numbers, t) for a in answers)
    rare = solutions(numbers, max_solutions=2)
    assert rare == {t: solutions(numbers)[t] for t, v in brute.items() if len(v) <= 2}


def test_the_harder_toy_draws_rare_targets_and_answers_with_fourteen_space_places():
    train, held_out = make_splits(300, 40, seed=3, num_numbers=4, max_solutions=2)
    assert all(len(p.numbers) == 4 and p.prompt.count(",") == 3 for p in train + held_out)
    assert all(1 <= len(solutions(p.numbers)[p.target]) <= 2 for p in held_out)
    assert not {p.key for p in train} & {p.key for p in held_out}
    answer = warm_start_answer(held_out[0], random.Random(0), space_prob=1.0)
    assert answer.count(" ") == 14 and _check(answer, held_out[0].numbers, held_out[0].target)
    # the three-number toy is unchanged by the generalisation: its spaces are drawn step by step, then the comma
    steps = solutions((9, 8, 3))[69][0]
    rng, ref = random.Random(1), random.Random(1)
    flags = [ref.random() < 0.5 for _ in range(9)]
    text = format_answer(steps, rng, 0.5)
    first, second = steps
    sp = [" " if f else "" for f in flags]
    assert text == (f"{first.left}{sp[0]}{first.op}{sp[1]}{first.right}{sp[2]}={sp[3]}{first.result},{sp[8]}"
                    f"{second.left}{sp[4]}{second.op}{sp[5]}{second.right}{sp[6]}={sp[7]}{second.result}")
