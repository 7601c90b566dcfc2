"""AEPO's theorem (paper Thm 4.3 / Cor 4.4) on a tabular softmax bandit, through the project's own loss.

Bandit: logits theta (K arms), pi = softmax(theta), pi^T = softmax(theta / T). A regularizer
update on positives drawn at temperature T moves theta along
    g(T) = E_{a ~ pi^T}[ r(a) grad_theta log pi(a) ] = pi^T - pi      (r = 1, grad log pi(a) = e_a - pi)
and the first-order entropy change of theta += eta * g is
    dH/deta = grad H . g = -sum_j pi_j (log pi_j + H) g_j = -Cov_pi(log pi, g).
The claim: > 0 for T > 1 (entropy up), = 0 at T = 1, < 0 for T < 1 (entropy down).
"""

import torch
import pytest

from services import algorithm as A
from services.config import AEPOConfig


def entropy(theta: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(theta, -1)
    return -(logp.exp() * logp).sum()


def cov_pi(theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    pi = torch.softmax(theta, -1)
    logp = torch.log(pi)
    return (pi * (logp - (pi * logp).sum()) * (g - (pi * g).sum())).sum()


def random_thetas(count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        K = int(torch.randint(2, 40, (1,), generator=gen))
        scale = float(torch.rand(1, generator=gen)) * 6
        yield torch.randn(K, dtype=torch.float64, generator=gen) * scale


def test_first_order_entropy_change_has_the_sign_of_t_minus_one_for_many_random_bandits():
    for theta in random_thetas(2000, seed=0):
        pi = torch.softmax(theta, -1)
        for T, sign in ((1.2, 1.0), (0.8, -1.0), (1.5, 1.0), (0.67, -1.0)):
            dH = -cov_pi(theta, torch.softmax(theta / T, -1) - pi)
            assert sign * dH > 0, (theta, T, dH)
        # T = 1: the positives are drawn from pi itself, g = 0 exactly
        assert abs(-cov_pi(theta, torch.softmax(theta / 1.0, -1) - pi)) < 1e-15


def regularizer_step_through_project_loss(theta: torch.Tensor, T: float, eta: float, n: int = 100_000):
    """One gradient step on services.algorithm.policy_loss with every row a kept positive.

    The n 'samples' are stratified: arm a appears round(n * pi^T(a)) times, so the batch's
    empirical distribution p_hat is pi^T up to 1/n rounding and the step is deterministic.
    Returns (theta after the step, p_hat).
    """
    pT = torch.softmax(theta / T, -1)
    counts = torch.round(pT * n).long()
    actions = torch.repeat_interleave(torch.arange(theta.numel()), counts)
    p_hat = counts.double() / counts.sum()
    th = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(th, -1)[actions].unsqueeze(1)  # [N, 1]: one-token responses
    N = actions.numel()
    cfg = AEPOConfig(mode="append", coef=1.0)
    loss, stats = A.policy_loss(
        cfg, logp=logp, old_logp=logp.detach(), advantages=torch.ones(N, dtype=torch.float64),
        mask=torch.ones(N, 1), is_regularizer=torch.ones(N, dtype=torch.bool), normalizer=N,
    )
    assert stats["reg_tokens"] == N and stats["grpo_tokens"] == 0
    loss.backward()
    return (theta - eta * th.grad).detach(), p_hat


@pytest.mark.parametrize("T", [0.8, 1.0, 1.2])
def test_a_small_step_on_the_regularizer_loss_changes_entropy_by_minus_cov(T):
    eta = 1e-4
    for theta in random_thetas(25, seed=1):
        new_theta, p_hat = regularizer_step_through_project_loss(theta, T, eta)
        pi = torch.softmax(theta, -1)
        # the loss gradient is -(p_hat - pi), so the step is eta * g with g = p_hat - pi
        assert torch.allclose((new_theta - theta) / eta, p_hat - pi, atol=1e-9)
        predicted = -eta * cov_pi(theta, p_hat - pi)
        finite_difference = entropy(new_theta) - entropy(theta)
        # second-order remainder is O(eta^2 |g|^2): well under 1e-3 relative plus 1e-12 absolute
        assert abs(finite_difference - predicted) <= 1e-3 * abs(predicted) + 1e-12
        if T != 1.0:
            assert (finite_difference > 0) == (T > 1.0)
