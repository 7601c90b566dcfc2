"""AEPO and its baselines, as pure functions over tensors (no Ray, vLLM, FSDP or HTTP here).

What the paper says (AEPO, "Arbitrary Entropy Policy Optimization"):
  * GRPO's objective is kept as it is. Besides the GRPO batch (T=1), each step draws a
    regularizer batch from a quarter of the prompts at T=1.2 when the measured entropy
    H <= H*, else at T=0.8. Correct samples that beat their group (advantage > 0.05) are kept,
    at most m (60 going up, 30 going down), and get a plain REINFORCE term -log pi(o) at T=1
    with advantage 1. Positives drawn hot pull entropy up, cold ones pull it down
    (Thm 4.3 / Cor 4.4; `tests/services/test_algorithm_theory.py` checks it numerically).

What the reference implementation (github 597358816/AEPO, verl fork) does:
  * advantages (r - mean) / (std + 1e-6) with the *unbiased* std (torch.std) per group;
  * the m selected sequences *replace* the first m sequences of the GRPO batch, which then
    goes through the ordinary PPO-clip update with advantage 1 on them (one update per step,
    so their ratio is 1 and the gradient is exactly REINFORCE's);
  * token-mean aggregation over the whole (mixed) batch; no KL;
  * the entropy fed to the controller is the sampled-token estimate mean(-log pi(o_t)) of the
    update batch, regularizer rows included; going down it keeps min(m, #pos) // 2.

What this module does, and where it differs:
  * `policy_loss` computes the regularizer rows' term as REINFORCE without clipping
    (the reference's gradient at ratio 1; with several optimizer steps per batch the reference
    would clip it), times an explicit `coef` (alpha; 1.0 reproduces the reference).
  * Two layouts: `replace` (the reference) and `append` (nothing dropped; the regularizer term
    is normalised by the GRPO token count, so GRPO's gradient is unchanged).
  * The controlled entropy defaults to the exact one at T=1 of the GRPO rows (`exact_entropy`);
    the reference's estimate is `sampled_entropy_estimate`.
  * approx_kl is Schulman's k3 ((r - 1) - log r, >= 0); the reference logs k1.
  * Clip-Cov and KL-Cov follow Cui et al. 2025 (and verl's implementation of them): Clip-Cov
    keeps PPO's clip and zeroes the gradient of max(1, int(ratio * n)) random tokens whose
    centred covariance lies in (lb, ub); KL-Cov drops PPO's clip and adds coef*|log r| on the
    top max(1, int(ratio * n)) tokens by covariance, over the micro-batch's GRPO tokens.

Losses are sums over the given tokens / `normalizer` (the global `loss_token_count`), so
micro-batches and ranks add up to the whole batch's token-mean. Rival controllers' levers too.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from services.config import (
    AEPOConfig,
    AdaptiveEntropyConfig,
    AEPOSignedConfig,
    AlgorithmConfig,
    ClipCovConfig,
    EntropyAdvConfig,
    EntropyRegConfig,
    KLCovConfig,
)

# ----------------------------------------------------------------------------- advantages


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, valid: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO advantages (r - mean) / (std + eps) within consecutive groups of `group_size`.

    std is the unbiased (n-1) sample std, as the reference's torch.std. A group whose rewards are
    all equal gets advantage 0 for every member. `valid` (bool per reward) marks samples with a
    verdict: mean and std are then over each group's valid members, invalid ones get 0 (a sample
    never judged neither moves its group's baseline nor gets a signal), and a group with < 2 valid
    members gets 0 throughout (one verdict has no baseline but itself). None/all True: unmasked.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-normalised advantages, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got shape {tuple(rewards.shape)}")
    if valid is not None and valid.shape != rewards.shape:
        raise ValueError(f"valid must have the rewards' shape {tuple(rewards.shape)}, got {tuple(valid.shape)}")
    r = rewards.reshape(-1, group_size).double()
    if valid is None or bool(valid.all()):  # bit for bit the unmasked path: runs without failures unchanged
        adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
    else:
        v = valid.reshape(-1, group_size).bool()
        n = v.sum(dim=1, keepdim=True).double()
        r = torch.where(v, r, 0.0)  # an invalid reward never reaches a sum, whatever it is (NaN * 0 is NaN)
        dev = torch.where(v, r - r.sum(dim=1, keepdim=True) / n.clamp_min(1.0), 0.0)
        std = (dev.square().sum(dim=1, keepdim=True) / (n - 1.0).clamp_min(1.0)).sqrt()
        adv = torch.where(v & (n >= 2), dev / (std + eps), 0.0)
    return adv.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


# ----------------------------------------------------------------------------- log-probs, entropy


def _row_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor | None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    with_entropy: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """log pi_T(tokens) and the exact full-vocabulary entropy of pi_T = softmax(logits / T).

    logits [B, L, V], tokens [B, L]. Rows (B*L positions) are processed `chunk_size` at a time,
    so no [B*L, V] float tensor beyond the logits themselves is alive at once outside a chunk.
    Differentiable. Returns ([B, L] or None, [B, L] or None).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, L, V = logits.shape
    flat = logits.reshape(B * L, V)
    flat_tok = tokens.reshape(B * L) if tokens is not None else None
    lps, ents = [], []
    for sl in _row_chunks(B * L, chunk_size):
        z = flat[sl]
        if z.dtype in (torch.float16, torch.bfloat16):  # softmax in half precision loses the tail
            z = z.float()
        logp = F.log_softmax(z / temperature, dim=-1)
        if flat_tok is not None:
            lps.append(logp.gather(-1, flat_tok[sl].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            ents.append(-(logp.exp() * logp).sum(-1))
    lp = torch.cat(lps).reshape(B, L) if flat_tok is not None else None
    ent = torch.cat(ents).reshape(B, L) if with_entropy else None
    return lp, ent


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = 4096
) -> torch.Tensor:
    """log pi_T(o_t) of the given tokens, [B, L] (chunked, differentiable)."""
    lp, _ = token_logprobs_and_entropy(logits, tokens, temperature, chunk_size, with_entropy=False)
    return lp


def exact_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 4096) -> torch.Tensor:
    """Exact entropy -sum_v pi_T(v) log pi_T(v) at every position, [B, L] (chunked, differentiable)."""
    _, ent = token_logprobs_and_entropy(logits, None, temperature, chunk_size, with_entropy=True)
    return ent


def entropy_split(
    logits: torch.Tensor, token_ids: Sequence[int], temperature: float = 1.0, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the exact entropy at every position into (irrelevant, content), [B, L] each.

    With S the given token set (e.g. the toy's optional space, which the reward ignores) and
    q = pi(S), the chain rule gives H(pi) = [H_b(q) + q H(pi | S)] + (1 - q) H(pi | not S):
    the first bracket is the entropy of choices the reward cannot see (whether to emit a token
    from S, and which), the second the entropy among the other tokens. Both are >= 0 and they
    sum to the exact entropy. `content` = -sum_{i not in S} p_i log p_i + (1 - q) log(1 - q).
    No grad.
    """
    B, L, V = logits.shape
    in_s = torch.zeros(V, dtype=torch.bool, device=logits.device)
    if len(token_ids):
        in_s[torch.as_tensor(list(token_ids), dtype=torch.long, device=logits.device)] = True
    flat = logits.detach().reshape(B * L, V)
    irr, con = [], []
    with torch.no_grad():
        for sl in _row_chunks(B * L, chunk_size):
            logp = F.log_softmax(flat[sl].float() / temperature, dim=-1)
            p = logp.exp()
            plogp = p * logp
            total = -plogp.sum(-1)
            rest = 1.0 - p[:, in_s].sum(-1)  # 1 - q
            content = -plogp[:, ~in_s].sum(-1) + torch.xlogy(rest, rest)
            content = content.clamp_min(0.0).minimum(total)
            con.append(content)
            irr.append(total - content)
    return torch.cat(irr).reshape(B, L), torch.cat(con).reshape(B, L)


def forking_split(
    entropy: torch.Tensor, mask: torch.Tensor, share: float = 0.2, bins: int = 2048, max_entropy: float | None = None
) -> torch.Tensor:
    """Sufficient statistics for the "forking tokens" split, as a [2, bins] tensor (counts, entropy sums).

    Tokens are binned by entropy on [0, max_entropy] (default: the largest value seen, so pass
    log V when ranks must agree). The statistics add across data-parallel ranks; `forking_stats`
    turns them into the top-`share` vs rest split. A histogram, not a sort, so it scales to
    millions of tokens and all-reduces in one call.
    """
    vals = entropy[mask > 0].detach().double().flatten()
    top = float(max_entropy) if max_entropy is not None else float(vals.max()) if vals.numel() else 1.0
    idx = (vals / max(top, 1e-12) * bins).long().clamp_(0, bins - 1)
    out = torch.zeros(2, bins, dtype=torch.float64)
    out[0].index_add_(0, idx.cpu(), torch.ones_like(vals).cpu())
    out[1].index_add_(0, idx.cpu(), vals.cpu())
    return out


def forking_stats(hist: torch.Tensor, share: float = 0.2) -> dict[str, float]:
    """From `forking_split` statistics: the highest-entropy bins holding >= `share` of the tokens.

    Returns the mean entropy of those forking tokens and of the rest, the fraction of all entropy
    they carry, and the fraction of tokens actually taken (>= share; bins are not split).
    """
    counts, sums = hist[0], hist[1]
    n, total = float(counts.sum()), float(sums.sum())
    if n == 0:
        nan = float("nan")
        return {"forking": nan, "nonforking": nan, "forking_entropy_share": nan, "forking_token_share": nan}
    from_top = counts.flip(0).cumsum(0)
    k = int(torch.searchsorted(from_top, torch.tensor(share * n, dtype=from_top.dtype)).item()) + 1
    k = min(k, len(counts))
    top_n, top_sum = float(from_top[k - 1]), float(sums.flip(0)[:k].sum())
    rest_n = n - top_n
    return {
        "forking": top_sum / top_n,
        "nonforking": (total - top_sum) / rest_n if rest_n > 0 else float("nan"),
        "forking_entropy_share": top_sum / total if total > 0 else float("nan"),
        "forking_token_share": top_n / n,
    }


def position_profile(
    entropy: torch.Tensor, mask: torch.Tensor, bucket: int = 1, buckets: int = 32
) -> torch.Tensor:
    """[2, buckets] (token counts, entropy sums) by response position: position p (0 = the first
    response token) goes to bucket min(p // bucket, buckets - 1). Adds across ranks."""
    m = mask > 0
    pos = (mask.cumsum(-1) - 1).long()
    idx = (pos[m] // bucket).clamp_(max=buckets - 1).cpu()
    out = torch.zeros(2, buckets, dtype=torch.float64)
    out[0].index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
    out[1].index_add_(0, idx, entropy[m].detach().double().cpu())
    return out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def sampled_entropy_estimate(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean of -log pi(o_t) over sampled tokens: an unbiased estimate of the mean entropy
    when o_t ~ pi (what the reference implementation feeds its controller)."""
    return masked_mean(-logp, mask)


# ----------------------------------------------------------------------------- AEPO regularizer


def regularizer_candidates(
    rewards: torch.Tensor, advantages: torch.Tensor, threshold: float = 0.05, signed: bool = False,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which regularizer samples may be trained on (bool mask); `select_regularizer` keeps the first m.

    AEPO: reward 1 and group advantage > threshold (correct answers from groups that are not
    all-correct). `signed` (the paper's ablation): every sample with |advantage| > threshold.
    `valid` (as in `group_advantages`): a sample without a verdict is never a candidate.
    """
    keep = advantages.abs() > threshold if signed else (rewards >= 1.0) & (advantages > threshold)
    return keep if valid is None else keep & valid.bool()


def select_regularizer(
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    m: int,
    threshold: float = 0.05,
    signed: bool = False,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the regularizer sequences from a regularizer batch; returns (indices, advantages).

    Default (AEPO): samples with reward 1 and group advantage > threshold, i.e. correct answers
    from groups that are not all-correct; the first m in batch order (as the reference), each
    with advantage 1. `signed` (the paper's ablation): every sample with |advantage| >
    threshold, negatives included, the first m, keeping their signed group advantages.
    `valid` excludes samples without a verdict (`regularizer_candidates`).
    """
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    if rewards.shape != advantages.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and advantages must be 1-D of one shape, got {tuple(rewards.shape)}, {tuple(advantages.shape)}")
    keep = regularizer_candidates(rewards, advantages, threshold, signed, valid)
    idx = keep.nonzero(as_tuple=False).flatten()[:m]
    adv = advantages[idx].float() if signed else torch.ones(idx.numel(), dtype=torch.float32)
    return idx, adv


def grpo_rows_kept(n_grpo: int, n_selected: int, mode: str) -> range:
    """Which GRPO rows stay in the update batch once n_selected regularizer rows join it.

    replace (reference): the selected rows replace the first n_selected GRPO rows;
    append: every GRPO row stays.
    """
    if mode == "replace":
        return range(min(n_selected, n_grpo), n_grpo)
    if mode == "append":
        return range(n_grpo)
    raise ValueError(f"unknown regularizer mode {mode!r} (replace | append)")


def loss_token_count(cfg: AlgorithmConfig, mask: torch.Tensor, is_regularizer: torch.Tensor) -> int:
    """Tokens this (micro-)batch contributes to the loss normaliser.

    AEPO in append mode normalises by the GRPO tokens only, so the GRPO gradient is exactly
    GRPO's; everything else (replace mode, the baselines) by every response token.
    """
    if isinstance(cfg, AEPOConfig) and cfg.mode == "append":
        return int((mask.bool() & ~is_regularizer.bool().unsqueeze(1)).sum().item())
    return int(mask.bool().sum().item())


def needs_entropy(cfg: AlgorithmConfig) -> bool:
    """True when `policy_loss` needs the per-token entropy (with grad for Entropy-Reg and the adaptive bonus)."""
    return isinstance(cfg, (EntropyRegConfig, EntropyAdvConfig, AdaptiveEntropyConfig))


# ----------------------------------------------------------------------------- policy losses


def ppo_clip_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A), optionally dual-clipped.

    Dual-clip (Ye et al. 2020) bounds the loss of negative advantages by -c*A. Returns
    (loss, clipped: bool mask of tokens whose gradient the clip removed, k3 approx-KL).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (loss > bound)
        loss = torch.where(dual_active, bound, loss)
        was_clipped = was_clipped | dual_active
    approx_kl = (ratio - 1.0) - log_ratio
    return loss, was_clipped, approx_kl.detach()


def _centred_cov(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A - mean A)(log pi - mean log pi) per token, means over the masked tokens (Cui et al.)."""
    lp = logp.detach()
    return (adv - masked_mean(adv, mask)) * (lp - masked_mean(lp, mask))


def clip_cov_token_loss(
    logp, old_logp, adv, mask, cfg: ClipCovConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip-Cov: PPO-clip, plus zero gradient on a random few tokens with cov in (lb, ub)."""
    loss, was_clipped, kl = ppo_clip_token_loss(logp, old_logp, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    cov = _centred_cov(logp, adv, mask)
    candidates = ((cov > cfg.cov_lb) & (cov < cfg.cov_ub) & mask.bool() & ~was_clipped).nonzero(as_tuple=False)
    n_cut = max(int(cfg.clip_ratio * int(mask.sum().item())), 1)
    if candidates.shape[0] > 0:
        perm = torch.randperm(candidates.shape[0], generator=generator)[:n_cut]
        chosen = candidates[perm]
        keep = torch.ones_like(loss)
        keep[chosen[:, 0], chosen[:, 1]] = 0.0
        loss = loss * keep
        was_clipped = was_clipped | (keep == 0)
    return loss, was_clipped, kl


def kl_cov_token_loss(logp, old_logp, adv, mask, cfg: KLCovConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL-Cov: unclipped -r A, plus coef*|log r| on the top tokens by cov(log pi, A)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss = -adv * ratio
    valid = mask.bool()
    n_valid = int(valid.sum().item())
    penalised = torch.zeros_like(valid)
    if n_valid > 0:
        k = max(1, int(n_valid * cfg.kl_ratio))
        cov = _centred_cov(logp, adv, mask).masked_fill(~valid, float("-inf"))
        top = torch.topk(cov.flatten(), k).indices
        penalised.view(-1)[top] = True
        loss = torch.where(penalised, loss + cfg.kl_coef * log_ratio.abs(), loss)
    approx_kl = ((ratio - 1.0) - log_ratio).detach()
    return loss, penalised, approx_kl


def entropy_advantage(adv: torch.Tensor, entropy: torch.Tensor, alpha: float, kappa: float) -> torch.Tensor:
    """Entropy-Adv (Cheng et al. 2025): A_t + min(alpha * H_t.detach(), |A_t| / kappa)."""
    return adv + torch.minimum(alpha * entropy.detach(), adv.abs() / kappa)


def confident_token_weights(old_logp: torch.Tensor, adv: torch.Tensor, levers: Mapping) -> torch.Tensor | None:
    """A rival controller's weights on the policy-gradient term (EntroPIC): 1 everywhere, except
    tokens the behaviour policy gave probability > prob_threshold, which get positive_weight where
    their advantage is > 0 and negative_weight where it is < 0. None when no lever is set."""
    threshold = levers.get("prob_threshold")
    w_pos, w_neg = float(levers.get("positive_weight", 1.0)), float(levers.get("negative_weight", 1.0))
    if threshold is None or (w_pos == 1.0 and w_neg == 1.0):
        return None
    confident, w = old_logp.detach().exp() > float(threshold), torch.ones_like(old_logp, requires_grad=False)
    w = torch.where(confident & (adv > 0), w_pos, w)
    return torch.where(confident & (adv < 0), w_neg, w)


def _entropy_bonus(cfg: AlgorithmConfig, entropy, grpo_mask: torch.Tensor, normalizer: float, levers: Mapping):
    """β·H summed over the GRPO tokens / normalizer: Entropy-Reg's fixed β or a rival's entropy_coef."""
    beta = cfg.beta if isinstance(cfg, EntropyRegConfig) else float(levers.get("entropy_coef", 0.0))
    if not beta:
        return torch.zeros((), dtype=grpo_mask.dtype)
    if entropy is None:
        raise ValueError(f"an entropy coefficient of {beta} needs the per-token entropy")
    return beta * (entropy * grpo_mask).sum() / normalizer


def _check_loss_inputs(cfg: AlgorithmConfig, normalizer: float, is_reg: torch.Tensor, entropy) -> None:
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if is_reg.any() and not isinstance(cfg, AEPOConfig):
        raise ValueError(f"{cfg.type} has no regularizer rows, but {int(is_reg.sum())} were passed")
    if needs_entropy(cfg) and entropy is None:
        raise ValueError(f"{cfg.type} needs the per-token entropy")


def _pg_token_loss(cfg: AlgorithmConfig, logp, old_logp, adv, grpo_mask, generator):
    """Per-token policy-gradient loss of the GRPO rows: Clip-Cov, KL-Cov or PPO-clip; (loss, clipped, kl)."""
    if isinstance(cfg, ClipCovConfig):
        return clip_cov_token_loss(logp, old_logp, adv, grpo_mask, cfg, generator)
    if isinstance(cfg, KLCovConfig):
        return kl_cov_token_loss(logp, old_logp, adv, grpo_mask, cfg)
    return ppo_clip_token_loss(logp, old_logp, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip)


def policy_loss(
    cfg: AlgorithmConfig,
    *,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_regularizer: torch.Tensor,
    normalizer: float,
    entropy: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    levers: Mapping | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The whole policy loss of one (micro-)batch for any algorithm in the config union.

    logp/old_logp/mask/entropy are [B, L] over response positions (log-probs at T=1);
    advantages [B] per sequence; is_regularizer [B] marks AEPO regularizer rows, whose
    advantage is 1 (or signed, for the ablation) as returned by `select_regularizer`.
    GRPO rows get the algorithm's policy-gradient loss, regularizer rows
    -coef * A * log pi(o_t). Both are summed over tokens and divided by `normalizer`.

    `levers` is a rival controller's decision for the step (`controller.rule.decide`):
    `confident_token_weights` scale the GRPO rows' per-token term, and entropy_coef c adds
    −c·H over the GRPO tokens (the adaptive bonus; Entropy-Reg's β is a fixed c).

    Returns (loss, stats) where pg_loss, reg_loss, entropy_bonus are additive across
    micro-batches and clipped_tokens, approx_kl_sum, grpo_tokens, reg_tokens are raw sums.
    """
    is_reg = is_regularizer.bool()
    _check_loss_inputs(cfg, normalizer, is_reg, entropy)
    maskf = mask.to(logp.dtype)
    grpo_mask = maskf * (~is_reg).unsqueeze(1).to(logp.dtype)
    reg_mask = maskf * is_reg.unsqueeze(1).to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1).expand_as(logp)

    if isinstance(cfg, EntropyAdvConfig):
        adv = entropy_advantage(adv, entropy, cfg.alpha, cfg.kappa)
    tok_loss, clipped, kl = _pg_token_loss(cfg, logp, old_logp, adv, grpo_mask, generator)
    weights = confident_token_weights(old_logp, adv, levers or {})
    if weights is not None:
        tok_loss = tok_loss * weights

    pg_loss = (tok_loss * grpo_mask).sum() / normalizer
    loss = pg_loss
    reg_loss = torch.zeros((), dtype=logp.dtype)
    if isinstance(cfg, AEPOConfig):
        reg_loss = (-cfg.coef * adv * logp * reg_mask).sum() / normalizer
        loss = loss + reg_loss
    bonus = _entropy_bonus(cfg, entropy, grpo_mask, normalizer, levers or {})
    loss = loss - bonus
    stats = {
        "pg_loss": float(pg_loss.detach()),
        "reg_loss": float(reg_loss.detach()),
        "entropy_bonus": float(bonus.detach()),
        "clipped_tokens": float((clipped.to(logp.dtype) * grpo_mask).sum()),
        "approx_kl_sum": float((kl * grpo_mask).sum()),
        "grpo_tokens": float(grpo_mask.sum()),
        "reg_tokens": float(reg_mask.sum()),
    }
    return loss, stats


def is_signed_regularizer(cfg: AlgorithmConfig) -> bool:
    """True for the signed-advantage ablation (negatives kept in the regularizer)."""
    return isinstance(cfg, AEPOSignedConfig)
