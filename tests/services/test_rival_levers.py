"""A rival controller's levers on the loss (services.algorithm.policy_loss(levers=...)), hand-worked."""

import math

import pytest
import torch

from services import algorithm as A
from services.config import AdaptiveEntropyConfig, EntroPICConfig, EntropyRegConfig, GRPOConfig

# two rows of two tokens; behaviour probabilities 0.99 / 0.5 and 0.97 / 0.3; advantages +1.5, -0.5
PROBS = torch.tensor([[0.99, 0.5], [0.97, 0.3]], dtype=torch.float64)
ADV = torch.tensor([1.5, -0.5], dtype=torch.float64)
MASK = torch.ones(2, 2)
NO_REG = torch.zeros(2, dtype=torch.bool)
ENTROPIC = {"entropy_coef": 0.0, "positive_weight": 0.7, "negative_weight": 1.3, "prob_threshold": 0.95}


def _loss(cfg, levers=None, entropy=None):
    logp = PROBS.log().clone().requires_grad_(True)
    loss, stats = A.policy_loss(cfg, logp=logp, old_logp=logp.detach(), advantages=ADV, mask=MASK,
                                is_regularizer=NO_REG, normalizer=4.0, entropy=entropy, levers=levers)
    loss.backward()
    return loss, stats, logp.grad


def test_confident_tokens_get_the_positive_or_negative_weight_by_the_sign_of_their_advantage():
    adv = ADV.unsqueeze(1).expand(2, 2)
    w = A.confident_token_weights(PROBS.log(), adv, ENTROPIC)
    # only 0.99 (advantage +1.5) and 0.97 (advantage -0.5) are above 0.95
    assert w.tolist() == [[0.7, 1.0], [1.3, 1.0]]
    zero_adv = A.confident_token_weights(PROBS.log(), torch.zeros(2, 2, dtype=torch.float64), ENTROPIC)
    assert zero_adv.tolist() == [[1.0, 1.0], [1.0, 1.0]]  # no sign, no weight
    assert A.confident_token_weights(PROBS.log(), adv, {**ENTROPIC, "positive_weight": 1.0, "negative_weight": 1.0}) is None


def test_entropic_weights_scale_the_on_policy_gradient_token_by_token():
    # on-policy the ratio is 1 and PPO's per-token loss is -A·r: d loss / d log π_t = -A_t · w_t / N
    _, _, grad = _loss(GRPOConfig(), ENTROPIC)
    expected = torch.tensor([[-1.5 * 0.7, -1.5], [0.5 * 1.3, 0.5]], dtype=torch.float64) / 4.0
    assert torch.allclose(grad, expected)
    _, _, plain = _loss(GRPOConfig())
    assert torch.allclose(plain, torch.tensor([[-1.5, -1.5], [0.5, 0.5]], dtype=torch.float64) / 4.0)


def test_neutral_levers_leave_the_loss_bit_identical():
    neutral = {"entropy_coef": 0.0, "positive_weight": 1.0, "negative_weight": 1.0, "prob_threshold": 0.95}
    a, _, ga = _loss(GRPOConfig(), neutral)
    b, _, gb = _loss(GRPOConfig(), None)
    assert a.item() == b.item() and torch.equal(ga, gb)


def test_the_adaptive_coefficient_is_the_entropy_bonus_with_beta_equal_to_it():
    ent = torch.tensor([[0.2, 0.9], [0.1, 1.1]], dtype=torch.float64, requires_grad=True)
    loss, stats, _ = _loss(AdaptiveEntropyConfig(), {"entropy_coef": 0.3}, ent)
    ref, ref_stats, _ = _loss(EntropyRegConfig(beta=0.3), None, ent)
    assert stats["entropy_bonus"] == pytest.approx(0.3 * (0.2 + 0.9 + 0.1 + 1.1) / 4.0)
    assert stats["entropy_bonus"] == pytest.approx(ref_stats["entropy_bonus"]) and loss.item() == pytest.approx(ref.item())
    # the bonus's gradient on each token's entropy is -c / N
    ent.grad = None
    loss, _, _ = _loss(AdaptiveEntropyConfig(), {"entropy_coef": 0.3}, ent)
    assert torch.allclose(ent.grad, torch.full((2, 2), -0.3 / 4.0, dtype=torch.float64))


def test_the_adaptive_rule_needs_the_entropy_and_the_entropic_rule_does_not():
    assert A.needs_entropy(AdaptiveEntropyConfig()) and not A.needs_entropy(EntroPICConfig())
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        _loss(AdaptiveEntropyConfig(), {"entropy_coef": 0.1})
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        _loss(GRPOConfig(), {"entropy_coef": 0.1})
    loss, _, _ = _loss(EntroPICConfig(), ENTROPIC)
    assert math.isfinite(loss.item())
