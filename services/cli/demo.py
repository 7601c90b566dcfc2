"""`aepo demo`: AEPO's mechanism end to end on a softmax bandit, in a few seconds on a CPU.

A single "prompt" with K answers (arms); the first K/4 are right 60 % of the time, the others
10 % (a noisy verifier keeps groups mixed, as a real task's hard prompts do). Each step draws a GRPO
batch at T=1, and for AEPO a regularizer batch at the temperature the controller's rule picks
(controller.rule.plan), selects its positives (services.algorithm.select_regularizer) and
applies the project's own policy loss (services.algorithm.policy_loss). GRPO's entropy
collapses onto a few correct arms; AEPO holds the target. No Ray, no model: just the math.
"""

from __future__ import annotations

import argparse

import torch

from controller.rule import ConstantTarget, plan
from services import algorithm as A
from services.config import AEPOConfig, AlgorithmConfig, GRPOConfig


def _draw(theta: torch.Tensor, n: int, temperature: float, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(theta / temperature, -1)
    return torch.multinomial(probs, n, replacement=True, generator=gen)


def run_bandit(
    cfg: AlgorithmConfig, *, steps: int, arms: int, lr: float, seed: int, groups: int = 16, group_size: int = 8
) -> list[float]:
    """Entropy (nats) of the policy after each step of GRPO or AEPO on the bandit."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(arms, dtype=torch.float64, generator=torch.Generator().manual_seed(1234))
    good = torch.arange(arms) < max(1, arms // 4)
    pay = torch.where(good, 0.6, 0.1).double()
    history: list[float] = []
    entropy: float | None = None
    for step in range(steps):
        actions = _draw(theta, groups * group_size, 1.0, gen)
        rewards = torch.bernoulli(pay[actions], generator=gen)
        adv = A.group_advantages(rewards, group_size)
        is_reg = torch.zeros(actions.numel(), dtype=torch.bool)
        if isinstance(cfg, AEPOConfig):
            p = plan(entropy, step, cfg.target, cfg.rule)
            n_reg_groups = max(1, round(groups * cfg.prompt_share))
            reg_actions = _draw(theta, n_reg_groups * group_size, p.temperature, gen)
            reg_rewards = torch.bernoulli(pay[reg_actions], generator=gen)
            idx, reg_adv = A.select_regularizer(
                reg_rewards, A.group_advantages(reg_rewards, group_size), p.m, cfg.adv_threshold
            )
            keep = torch.tensor(list(A.grpo_rows_kept(actions.numel(), idx.numel(), cfg.mode)), dtype=torch.long)
            actions = torch.cat([reg_actions[idx], actions[keep]])
            adv = torch.cat([reg_adv.double(), adv[keep]])
            is_reg = torch.cat([torch.ones(idx.numel(), dtype=torch.bool), torch.zeros(keep.numel(), dtype=torch.bool)])
        th = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(th, -1)[actions].unsqueeze(1)
        mask = torch.ones_like(logp)
        loss, _ = A.policy_loss(
            cfg, logp=logp, old_logp=logp.detach(), advantages=adv, mask=mask, is_regularizer=is_reg,
            normalizer=A.loss_token_count(cfg, mask, is_reg),
        )
        loss.backward()
        theta = (theta - lr * th.grad).detach()
        entropy = float(A.exact_entropy(theta.view(1, 1, -1)))
        history.append(entropy)
    return history


def main(args: argparse.Namespace) -> int:
    base = float(A.exact_entropy(torch.randn(args.arms, dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(1234)).view(1, 1, -1)))
    targets = [round(base * f, 2) for f in (0.25, 0.5)]
    runs: dict[str, list[float]] = {"grpo": run_bandit(GRPOConfig(), steps=args.steps, arms=args.arms, lr=args.lr, seed=args.seed)}
    for t in targets:
        cfg = AEPOConfig(target=ConstantTarget(value=t), prompt_share=1.0, rule={"m_up": 64, "m_down": 32})
        runs[f"aepo H*={t}"] = run_bandit(cfg, steps=args.steps, arms=args.arms, lr=args.lr, seed=args.seed)
    marks = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    print(f"softmax bandit: {args.arms} arms ({max(1, args.arms // 4)} good), base entropy {base:.3f} nats, "
          f"{args.steps} steps, 16 groups x 8 samples")
    print(f"{'run':<16}" + "".join(f"{'step ' + str(m + 1):>11}" for m in marks) + f"{'|H-H*| 2nd half':>18}")
    for name, hist in runs.items():
        row = f"{name:<16}" + "".join(f"{hist[m]:>11.3f}" for m in marks)
        if name.startswith("aepo"):
            t = float(name.split("=")[1])
            half = hist[len(hist) // 2:]
            row += f"{sum(abs(h - t) for h in half) / len(half):>18.3f}"
        print(row)
    print("GRPO's entropy falls; AEPO's regularizer (positives drawn at T=1.2 when H <= H*, else 0.8) holds H*.")
    return 0
