"""The AEPO math against hand-worked and brute-force values (services/algorithm.py)."""

from fractions import Fraction
from itertools import combinations
import math

import pytest
import torch

from services import algorithm as A
from services.loop.evaluation import avg_at_k, pass_at_k
from services.config import (
    AEPOConfig,
    AEPOSignedConfig,
    ClipCovConfig,
    EntropyAdvConfig,
    EntropyRegConfig,
    GRPOConfig,
    KLCovConfig,
)

# --------------------------------------------------------------------------- advantages


def test_group_advantage_of_one_correct_in_four_is_1_5_and_minus_0_5():
    # mean 0.25; unbiased std = sqrt((0.75^2 + 3*0.25^2) / 3) = sqrt(0.25) = 0.5
    # -> (1 - 0.25)/0.5 = 1.5 and (0 - 0.25)/0.5 = -0.5 (eps 1e-6 shifts the 7th digit)
    adv = A.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), group_size=4)
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    # an all-correct group carries no signal
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_advantage_of_a_pair_is_plus_minus_one_over_root_two():
    # G=2, rewards (1, 0): mean 0.5, unbiased std sqrt(0.5) -> ±0.5/0.7071 = ±0.7071
    adv = A.group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    assert adv.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], abs=1e-5)


def test_group_advantage_rejects_a_ragged_batch():
    with pytest.raises(ValueError, match="multiple of 4"):
        A.group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        A.group_advantages(torch.zeros(6), group_size=1)


# --------------------------------------------------------------------------- PPO-clip


def _tok(vals):
    return torch.tensor([vals], dtype=torch.float64)


def test_ppo_clip_matches_hand_computed_values():
    # ratios r = [1.5, 0.5, 0.5, 1.5], advantages [1, 1, -1, -1], eps 0.2:
    #  r=1.5,A=+1: -min(1.5, 1.2)      = -1.2 (clipped)
    #  r=0.5,A=+1: -min(0.5, 0.8)      = -0.5
    #  r=0.5,A=-1: -min(-0.5, -0.8)    =  0.8 (clipped)
    #  r=1.5,A=-1: -min(-1.5, -1.2)    =  1.5
    ratio = _tok([1.5, 0.5, 0.5, 1.5])
    adv = _tok([1.0, 1.0, -1.0, -1.0])
    logp = torch.log(ratio).requires_grad_(True)
    loss, clipped, kl = A.ppo_clip_token_loss(logp, torch.zeros_like(logp), adv)
    assert loss.tolist()[0] == pytest.approx([-1.2, -0.5, 0.8, 1.5])
    assert clipped.tolist()[0] == [True, False, True, False]
    # k3: (r - 1) - log r; for r=1.5: 0.5 - 0.405465 = 0.094535
    assert kl[0, 0].item() == pytest.approx(0.5 - math.log(1.5))
    # clipped tokens carry no gradient; the others d(-A r)/dlogp = -A r
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.5, 0.0, 1.5])


def test_clip_higher_lets_a_positive_token_rise_to_1_28():
    # r = 1.25, A = 1: symmetric eps 0.2 clips at 1.2 -> loss -1.2; DAPO's 0.2/0.28 does not -> -1.25
    logp = torch.log(_tok([1.25]))
    sym, c1, _ = A.ppo_clip_token_loss(logp, torch.zeros_like(logp), _tok([1.0]))
    hi, c2, _ = A.ppo_clip_token_loss(logp, torch.zeros_like(logp), _tok([1.0]), clip_low=0.2, clip_high=0.28)
    assert sym.item() == pytest.approx(-1.2) and c1.item()
    assert hi.item() == pytest.approx(-1.25) and not c2.item()


def test_dual_clip_caps_a_negative_advantage_loss_at_c_times_abs_a():
    # r = 4, A = -1: PPO loss max(4, 1.2) = 4; dual-clip c=3 caps it at 3 (and cuts the gradient);
    # r = 2, A = -1: PPO loss 2 < 3, untouched; positive advantages are never dual-clipped.
    logp = torch.log(_tok([4.0, 2.0, 4.0])).requires_grad_(True)
    adv = _tok([-1.0, -1.0, 1.0])
    loss, clipped, _ = A.ppo_clip_token_loss(logp, torch.zeros_like(logp), adv, dual_clip=3.0)
    assert loss.tolist()[0] == pytest.approx([3.0, 2.0, -1.2])
    assert clipped.tolist()[0] == [True, False, True]
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 2.0, 0.0])


def test_entropy_advantage_matches_hand_computed_values():
    # alpha 0.4, kappa 2: A + min(0.4 H, |A|/2)
    #  A=1,H=0.5 -> 1 + min(0.2, 0.5) = 1.2 ;  A=1,H=3 -> 1 + min(1.2, 0.5) = 1.5
    #  A=-1,H=0.5 -> -1 + 0.2 = -0.8       ;  A=0 -> 0 (the cap |A|/kappa is 0)
    adv = torch.tensor([1.0, 1.0, -1.0, 0.0])
    ent = torch.tensor([0.5, 3.0, 0.5, 2.0], requires_grad=True)
    out = A.entropy_advantage(adv, ent, alpha=0.4, kappa=2.0)
    assert out.tolist() == pytest.approx([1.2, 1.5, -0.8, 0.0])
    assert not out.requires_grad  # the entropy enters detached


# --------------------------------------------------------------------------- entropy, log-probs


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
def test_chunked_entropy_and_logprobs_equal_the_naive_computation(chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    naive_h = torch.distributions.Categorical(logits=logits).entropy()
    naive_lp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lp, h = A.token_logprobs_and_entropy(logits, tokens, chunk_size=chunk)
    assert torch.allclose(h, naive_h, atol=1e-12)
    assert torch.allclose(lp, naive_lp, atol=1e-12)
    assert torch.allclose(A.exact_entropy(logits, chunk_size=chunk), naive_h, atol=1e-12)
    assert torch.allclose(A.token_logprobs(logits, tokens, chunk_size=chunk), naive_lp, atol=1e-12)


@pytest.mark.parametrize("T", [0.5, 0.8, 1.2, 2.0])
def test_entropy_at_temperature_is_the_entropy_of_softmax_z_over_t(T):
    logits = torch.randn(2, 4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.distributions.Categorical(logits=logits / T).entropy()
    assert torch.allclose(A.exact_entropy(logits, temperature=T, chunk_size=3), want, atol=1e-12)


def test_higher_temperature_means_higher_entropy():
    logits = torch.randn(1, 6, 20, generator=torch.Generator().manual_seed(2))
    h08, h1, h12 = (A.exact_entropy(logits, temperature=t).mean() for t in (0.8, 1.0, 1.2))
    assert h08 < h1 < h12


def test_sampled_entropy_estimate_converges_to_the_exact_entropy():
    # One distribution, N = 200k samples: the estimate's std error is sigma/sqrt(N) with
    # sigma^2 = Var[-log p(o)]; assert within 5 standard errors (a false alarm ~ 1 in 1.7M).
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(17, dtype=torch.float64, generator=g) * 2
    logp_all = torch.log_softmax(logits, -1)
    exact = -(logp_all.exp() * logp_all).sum().item()
    N = 200_000
    samples = torch.multinomial(logp_all.exp(), N, replacement=True, generator=g)
    logp = logp_all[samples].reshape(1, N)
    est = A.sampled_entropy_estimate(logp, torch.ones_like(logp)).item()
    sigma = (-logp).std().item()
    assert abs(est - exact) < 5 * sigma / math.sqrt(N)


def test_masked_mean_ignores_padding_and_survives_an_empty_mask():
    x = torch.tensor([[1.0, 2.0, 100.0]])
    assert A.masked_mean(x, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.5)
    assert A.masked_mean(x, torch.zeros(1, 3)).item() == 0.0


# --------------------------------------------------------------------------- regularizer selection


def test_selection_keeps_correct_samples_of_mixed_groups_in_order_up_to_m():
    # G=4: group0 all correct (adv 0) -> dropped; group1 one correct -> index 4 (adv 1.5);
    # group2 two correct -> 8, 9 (adv +0.866); group3 none correct -> nothing.
    rewards = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
    adv = A.group_advantages(rewards, 4)
    idx, sel_adv = A.select_regularizer(rewards, adv, m=60)
    assert idx.tolist() == [4, 8, 9]
    assert sel_adv.tolist() == [1.0, 1.0, 1.0]
    idx2, _ = A.select_regularizer(rewards, adv, m=2)
    assert idx2.tolist() == [4, 8]
    assert A.select_regularizer(rewards, adv, m=0)[0].numel() == 0


def test_selection_threshold_is_strict_and_needs_reward_one():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])
    adv = torch.tensor([0.04, 0.05, 0.06, 0.9])  # 0.05 is not > 0.05; reward 0 never kept
    idx, _ = A.select_regularizer(rewards, adv, m=10, threshold=0.05)
    assert idx.tolist() == [2]


def test_signed_ablation_keeps_negatives_with_their_advantages():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv = A.group_advantages(rewards, 4)
    idx, sel_adv = A.select_regularizer(rewards, adv, m=60, signed=True)
    assert idx.tolist() == [0, 1, 2, 3]
    assert sel_adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)


def test_replace_drops_the_first_m_grpo_rows_and_append_drops_none():
    assert list(A.grpo_rows_kept(8, 3, "replace")) == [3, 4, 5, 6, 7]
    assert list(A.grpo_rows_kept(8, 20, "replace")) == []
    assert list(A.grpo_rows_kept(8, 3, "append")) == list(range(8))


# --------------------------------------------------------------------------- composed losses


class TinyPolicy(torch.nn.Module):
    """Embedding + linear: enough parameters for gradients to be compared."""

    def __init__(self, vocab=7, dim=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.out = torch.nn.Linear(dim, vocab)
        self.double()

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def _batch(B=8, L=4, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    tokens = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    mask[6, 2:] = 0
    return ids, tokens, mask


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters()])


def test_aepo_append_gradient_is_grpo_gradient_plus_alpha_times_reinforce_gradient():
    model = TinyPolicy()
    ids, tokens, mask = _batch()
    is_reg = torch.tensor([False] * 6 + [True] * 2)
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, 0.0, 1.0, 1.0], dtype=torch.float64)
    alpha = 0.7
    cfg = AEPOConfig(mode="append", coef=alpha)

    def logp_fn():
        return A.token_logprobs(model(ids), tokens)

    with torch.no_grad():  # old policy != current, so ratios differ from 1 and clipping is live
        old = logp_fn() + 0.3 * torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    n_grpo = A.loss_token_count(cfg, mask, is_reg)
    assert n_grpo == int(mask[:6].sum())  # append: the GRPO tokens only

    loss, stats = A.policy_loss(
        cfg, logp=logp_fn(), old_logp=old, advantages=adv, mask=mask, is_regularizer=is_reg, normalizer=n_grpo
    )
    g_aepo = _grads(model, loss)

    grpo_loss, _ = A.policy_loss(
        GRPOConfig(), logp=logp_fn()[:6], old_logp=old[:6], advantages=adv[:6], mask=mask[:6],
        is_regularizer=is_reg[:6], normalizer=n_grpo,
    )
    g_grpo = _grads(model, grpo_loss)
    reinforce = -(logp_fn()[6:] * mask[6:]).sum() / n_grpo
    g_reg = _grads(model, reinforce)

    assert torch.allclose(g_aepo, g_grpo + alpha * g_reg, atol=1e-12)
    assert stats["reg_tokens"] == float(mask[6:].sum()) and stats["grpo_tokens"] == float(n_grpo)


def test_replace_mode_normalises_by_every_token_of_the_mixed_batch():
    _, _, mask = _batch()
    is_reg = torch.tensor([True] * 2 + [False] * 6)
    assert A.loss_token_count(AEPOConfig(mode="replace"), mask, is_reg) == int(mask.sum())
    assert A.loss_token_count(GRPOConfig(), mask, torch.zeros(8, dtype=torch.bool)) == int(mask.sum())


def test_micro_batch_losses_add_up_to_the_full_batch_loss():
    model = TinyPolicy(seed=1)
    ids, tokens, mask = _batch(seed=1)
    is_reg = torch.tensor([True, True] + [False] * 6)
    adv = torch.linspace(-1, 1, 8, dtype=torch.float64)
    cfg = AEPOConfig(mode="replace")
    with torch.no_grad():
        old = A.token_logprobs(model(ids), tokens) - 0.1
    N = A.loss_token_count(cfg, mask, is_reg)

    def part(sl):
        return A.policy_loss(
            cfg, logp=A.token_logprobs(model(ids[sl]), tokens[sl]), old_logp=old[sl], advantages=adv[sl],
            mask=mask[sl], is_regularizer=is_reg[sl], normalizer=N,
        )

    full, s_full = part(slice(0, 8))
    a, s_a = part(slice(0, 3))
    b, s_b = part(slice(3, 8))
    assert (a + b).item() == pytest.approx(full.item(), abs=1e-12)
    for key in ("pg_loss", "reg_loss", "clipped_tokens", "grpo_tokens", "reg_tokens"):
        assert s_a[key] + s_b[key] == pytest.approx(s_full[key], abs=1e-12)


def test_signed_ablation_regularizer_term_uses_the_signed_advantage():
    # one regularizer row of 2 tokens with logp (-1, -2) and advantage -0.5, coef 1, N = 2:
    # reg_loss = -(-0.5)(-1 - 2) / 2 = -0.75
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    _, stats = A.policy_loss(
        AEPOSignedConfig(), logp=logp, old_logp=logp, advantages=torch.tensor([-0.5]), mask=torch.ones(1, 2),
        is_regularizer=torch.tensor([True]), normalizer=2,
    )
    assert stats["reg_loss"] == pytest.approx(-0.75)


def test_entropy_reg_gradient_flows_through_the_exact_entropy():
    model = TinyPolicy(seed=2)
    ids, tokens, mask = _batch(seed=2)
    no_reg = torch.zeros(8, dtype=torch.bool)
    adv = torch.linspace(-1, 1, 8, dtype=torch.float64)
    with torch.no_grad():
        old = A.token_logprobs(model(ids), tokens)
    N = int(mask.sum())
    beta = 0.015

    def terms():
        lp, ent = A.token_logprobs_and_entropy(model(ids), tokens)
        return lp, ent

    lp, ent = terms()
    loss, stats = A.policy_loss(
        EntropyRegConfig(beta=beta), logp=lp, old_logp=old, advantages=adv, mask=mask, is_regularizer=no_reg,
        normalizer=N, entropy=ent,
    )
    g = _grads(model, loss)
    lp, _ = terms()
    g_pg = _grads(model, A.policy_loss(GRPOConfig(), logp=lp, old_logp=old, advantages=adv, mask=mask,
                                       is_regularizer=no_reg, normalizer=N)[0])
    _, ent = terms()
    g_h = _grads(model, (ent * mask).sum() / N)
    assert torch.allclose(g, g_pg - beta * g_h, atol=1e-12)
    assert stats["entropy_bonus"] == pytest.approx(beta * float((ent.detach() * mask).sum() / N))


def test_non_aepo_algorithms_refuse_regularizer_rows_and_missing_entropy():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="no regularizer rows"):
        A.policy_loss(GRPOConfig(), logp=x, old_logp=x, advantages=torch.zeros(1), mask=torch.ones(1, 2),
                      is_regularizer=torch.tensor([True]), normalizer=2)
    with pytest.raises(ValueError, match="entropy"):
        A.policy_loss(EntropyAdvConfig(), logp=x, old_logp=x, advantages=torch.zeros(1), mask=torch.ones(1, 2),
                      is_regularizer=torch.tensor([False]), normalizer=2)


def test_clip_cov_cuts_the_gradient_of_exactly_the_chosen_in_band_tokens():
    # 1 row x 4 tokens, ratio 1 everywhere (no PPO clip). adv = [3, -3, 3, -3],
    # logp = [-0.1, -3, -0.5, -2.6] -> means 0 and -1.55 -> cov = 3*(1.45), -3*(-1.45), 3*(1.05), -3*(-1.05)
    #       = [4.35, 4.35, 3.15, 3.15], all inside (1, 5). clip_ratio 0.5 -> max(1, int(0.5*4)) = 2 cut.
    logp = torch.tensor([[-0.1, -3.0, -0.5, -2.6]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[3.0, -3.0, 3.0, -3.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    cfg = ClipCovConfig(clip_ratio=0.5)
    loss, cut, _ = A.clip_cov_token_loss(logp, logp.detach(), adv, mask, cfg, torch.Generator().manual_seed(0))
    assert int(cut.sum()) == 2
    loss.sum().backward()
    # the gradient of -A r at r=1 is -A; the cut tokens have 0
    want = torch.where(cut, torch.zeros_like(adv), -adv)
    assert torch.equal(logp.grad, want)
    # default ratio 2e-4 on 4 tokens still cuts max(1, int(0.0008)) = 1
    _, cut1, _ = A.clip_cov_token_loss(logp, logp.detach(), adv, mask, ClipCovConfig(), torch.Generator().manual_seed(0))
    assert int(cut1.sum()) == 1


def test_kl_cov_penalises_the_top_covariance_token_with_abs_log_ratio():
    # cov = (A - mean A)(logp - mean logp); token 0 has the largest (see clip-cov test) among
    # [4.35, 4.35 ...] -> use distinct values: logp = [-0.1, -3, -0.5, -2.0], adv [3,-3,3,-3]
    # mean logp -1.4 -> cov = [3.9, 4.8, 2.7, 1.8] -> top-1 is token 1.
    logp = torch.tensor([[-0.1, -3.0, -0.5, -2.0]], dtype=torch.float64)
    old = logp - 0.2  # log r = 0.2 everywhere, r = e^0.2
    adv = torch.tensor([[3.0, -3.0, 3.0, -3.0]], dtype=torch.float64)
    loss, pen, _ = A.kl_cov_token_loss(logp, old, adv, torch.ones(1, 4), KLCovConfig(kl_ratio=0.25, kl_coef=1.0))
    r = math.exp(0.2)
    assert pen.tolist()[0] == [False, True, False, False]
    assert loss.tolist()[0] == pytest.approx([-3 * r, 3 * r + 0.2, -3 * r, 3 * r])


# --------------------------------------------------------------------------- pass@k


def _brute_pass_at_k(n, c, k):
    items = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(items[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(1024, 1, 1), (1024, 3, 512), (1024, 10, 1024), (1024, 500, 64), (1000, 1, 999)])
def test_pass_at_k_is_exact_at_n_1024(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_1_is_the_success_rate_and_bad_arguments_raise():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_avg_at_k_is_mean_correctness():
    assert avg_at_k(torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1]])) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- where the entropy lives


def test_entropy_split_by_hand():
    """p = (1/2, 1/4, 1/4), S = {token 0}: H = 1.5 bits; the S-vs-rest choice is 1 bit and the
    rest's own choice 1/2 * 1 bit (in nats: times ln 2)."""
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    irr, con = A.entropy_split(logits, [0])
    assert float(irr) == pytest.approx(math.log(2), rel=1e-6)
    assert float(con) == pytest.approx(0.5 * math.log(2), rel=1e-6)
    irr, con = A.entropy_split(logits, [])  # nothing is irrelevant
    assert float(irr) == pytest.approx(0.0, abs=1e-7) and float(con) == pytest.approx(1.5 * math.log(2), rel=1e-6)
    irr, con = A.entropy_split(logits, [1, 2])  # choosing among S is irrelevant too: all of H
    assert float(con) == pytest.approx(0.0, abs=1e-7) and float(irr) == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_forking_stats_by_hand():
    """Entropies 0.1, 0.2, ..., 1.0 (10 tokens): the top 20 % are 0.9 and 1.0."""
    ent = torch.arange(1, 11, dtype=torch.float64).reshape(2, 5) / 10
    mask = torch.ones(2, 5)
    mask_pad = torch.cat([mask, torch.zeros(2, 1)], 1)
    ent_pad = torch.cat([ent, torch.full((2, 1), 5.0, dtype=torch.float64)], 1)  # padding must not count
    st = A.forking_stats(A.forking_split(ent_pad, mask_pad, max_entropy=math.log(23)), 0.2)
    assert st["forking_token_share"] == pytest.approx(0.2)
    assert st["forking"] == pytest.approx(0.95) and st["nonforking"] == pytest.approx(0.45)
    assert st["forking_entropy_share"] == pytest.approx(1.9 / 5.5)
    # histograms from two "ranks" add up to the whole batch's
    h = A.forking_split(ent[:1], mask[:1], max_entropy=math.log(23)) + A.forking_split(ent[1:], mask[1:], max_entropy=math.log(23))
    assert A.forking_stats(h, 0.2)["forking"] == pytest.approx(0.95)


def test_position_profile_by_hand():
    ent = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 9.0, 4.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])  # response positions 0,1,2 and 0
    prof = A.position_profile(ent, mask, bucket=2, buckets=2)
    assert prof[0].tolist() == [3.0, 1.0] and prof[1].tolist() == [7.0, 3.0]


def test_regularizer_candidates_are_the_one_positives_predicate():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    adv = torch.tensor([0.9, 0.03, -0.6, -0.2, 0.04])
    # AEPO: correct and advantage > 0.05 -> only row 0; signed ablation: |adv| > 0.05 -> rows 0, 2, 3
    assert A.regularizer_candidates(rewards, adv, 0.05).tolist() == [True, False, False, False, False]
    assert A.regularizer_candidates(rewards, adv, 0.05, signed=True).tolist() == [True, False, True, True, False]
    idx, sel = A.select_regularizer(rewards, adv, m=2, threshold=0.05, signed=True)
    assert idx.tolist() == [0, 2] and sel.tolist() == pytest.approx([0.9, -0.6])
