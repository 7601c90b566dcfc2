"""Group advantages and regularizer selection with samples that have no verdict (services/algorithm.py).

A sample whose verification timed out or errored is masked out (`valid` False): its group's
statistics are over the members with a verdict, and it is never selected.
"""

import math
import random

import pytest
import torch

from services import algorithm as A

F = float("nan")  # a failed sample's reward: NaN, so any use of it in the statistics would show


def test_a_failed_member_is_left_out_of_its_groups_mean_and_std():
    # group [1, 0, 0, fail] -> statistics over [1, 0, 0]:
    #   mean 1/3; deviations 2/3, -1/3, -1/3; squares 4/9 + 1/9 + 1/9 = 2/3;
    #   unbiased var (2/3) / (3 - 1) = 1/3, std sqrt(1/3) = 1/sqrt(3)
    #   -> (2/3) * sqrt(3) = 2/sqrt(3) = 1.1547 and (-1/3) * sqrt(3) = -1/sqrt(3) = -0.5774; fail -> 0
    #   (scored as 0 instead, [1, 0, 0, 0] gives 1.5 and -0.5: the bias masking removes)
    # group [1, fail, fail, 0] -> over [1, 0]: mean 1/2, std sqrt(1/2) -> ±1/sqrt(2) = ±0.7071
    r = torch.tensor([1.0, 0, 0, F, 1, F, F, 0])
    valid = ~r.isnan()
    adv = A.group_advantages(r, 4, valid=valid)
    s3, s2 = math.sqrt(3), math.sqrt(2)
    assert adv.tolist() == pytest.approx([2 / s3, -1 / s3, -1 / s3, 0, 1 / s2, 0, 0, -1 / s2], abs=1e-5)


def test_a_group_with_fewer_than_two_verdicts_or_all_equal_ones_gets_zero():
    # [fail, 1, fail, fail]: one verdict has no baseline but itself -> 0 (no NaN from an n-1 = 0 std)
    # [fail x4]: nothing to train on -> 0;  [1, 1, fail, 1]: the verdicts agree -> 0, as unmasked
    r = torch.tensor([F, 1, F, F, F, F, F, F, 1, 1, F, 1])
    adv = A.group_advantages(r, 4, valid=~r.isnan())
    assert adv.tolist() == [0.0] * 12


def test_masked_advantages_equal_the_unmasked_function_on_each_groups_valid_members():
    gen = random.Random(0)
    for trial in range(200):
        G = gen.choice([2, 3, 4, 8])
        n_groups = gen.randint(1, 6)
        binary = trial % 2 == 0  # 0/1 verdicts and arbitrary real rewards
        rewards = [float(gen.random() < 0.5) if binary else gen.gauss(0, 2) for _ in range(G * n_groups)]
        valid = [gen.random() < 0.7 for _ in rewards]
        got = A.group_advantages(torch.tensor(rewards, dtype=torch.float64), G, valid=torch.tensor(valid))
        for g in range(n_groups):
            members = [i for i in range(g * G, (g + 1) * G) if valid[i]]
            want = dict.fromkeys(range(g * G, (g + 1) * G), 0.0)
            if len(members) >= 2:  # brute force: the unmasked function on the valid subset alone
                sub = A.group_advantages(torch.tensor([rewards[i] for i in members], dtype=torch.float64), len(members))
                want.update(zip(members, sub.tolist()))
            for i, w in want.items():
                assert got[i].item() == pytest.approx(w, rel=1e-12, abs=1e-12), (trial, g, i)


def test_nothing_masked_is_bit_identical_to_the_unmasked_path():
    r = torch.rand(64, dtype=torch.float64)
    plain = A.group_advantages(r, 8)
    assert torch.equal(A.group_advantages(r, 8, valid=torch.ones(64, dtype=torch.bool)), plain)
    assert torch.equal(A.group_advantages(r, 8, valid=None), plain)
    r32 = torch.tensor([1.0, 0, 0, 0], dtype=torch.float32)  # the caller's dtype comes back, as before
    assert A.group_advantages(r32, 4, valid=torch.tensor([True, True, True, False])).dtype == torch.float32


def test_a_mask_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="valid must have the rewards' shape"):
        A.group_advantages(torch.zeros(8), 4, valid=torch.ones(4, dtype=torch.bool))


def test_the_regularizer_never_selects_a_failed_sample():
    # advantages as if the failed sample at index 0 had been judged: it would be the first pick
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    adv = torch.tensor([0.8, -0.8, 0.8, -0.8])
    valid = torch.tensor([False, True, True, True])
    idx, sel = A.select_regularizer(rewards, adv, m=4, threshold=0.05, valid=valid)
    assert idx.tolist() == [2] and sel.tolist() == [1.0]
    assert A.select_regularizer(rewards, adv, m=4, threshold=0.05)[0].tolist() == [0, 2]  # unmasked: picked
    idx, sel = A.select_regularizer(rewards, adv, m=4, threshold=0.05, signed=True, valid=valid)
    assert idx.tolist() == [1, 2, 3] and sel.tolist() == pytest.approx([-0.8, 0.8, -0.8])
    cand = A.regularizer_candidates(rewards, adv, 0.05, signed=True, valid=valid)
    assert cand.tolist() == [False, True, True, True]
