"""The FSDP2 learner group: 2 Ray actors over gloo against a single-process reference update."""

from __future__ import annotations


import pytest
from services.backends.network import free_port
import torch
from reference_decoding import hf_model_with

from services import algorithm as alg
from services.config import (
    AEPOConfig,
    ClipCovConfig,
    EntropyAdvConfig,
    EntropyRegConfig,
    GRPOConfig,
    KLCovConfig,
    LearnerConfig,
)
from services.learner.batch import TrainBatch, shard_batch
from services.learner.group import LearnerGroup
from services.learner.worker import LearnerWorker

# 2 learners share the 2-CPU test machine with whatever else the session runs: a quarter CPU each.
CFG = LearnerConfig(num_workers=2, cpus_per_worker=0.25, lr=1e-4, micro_batch_size=2, mini_batches=2, grad_clip=1.0)
ALGO = AEPOConfig(mode="replace", coef=1.0)


def make_batch(rows: int = 10, n_reg: int = 2, seed: int = 0) -> TrainBatch:
    """Random prompts (<bos> + 3..7 chars) and responses (1..9 chars + <eos>), uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(4, 23, (int(torch.randint(3, 8, (), generator=g)),), generator=g).tolist() for _ in range(rows)]
    responses = [torch.randint(4, 23, (int(torch.randint(1, 10, (), generator=g)),), generator=g).tolist() + [2] for _ in range(rows)]
    advantages = torch.randn(rows, generator=g)
    advantages[:n_reg] = 1.0  # regularizer rows carry advantage 1 (select_regularizer's convention)
    return TrainBatch.from_sequences(prompts, responses, advantages, [i < n_reg for i in range(rows)], pad_id=0)


def reference_update(model_path: str, cfg: LearnerConfig, algo, batch: TrainBatch) -> tuple[dict, dict]:
    """The update written the plain way: one process, no FSDP, whole mini-batches at once.

    Old log-probs at T=1 from a no-grad forward of the initial model; mini-batch k is rows
    [k*B/M, (k+1)*B/M); loss = policy_loss with the mini-batch's own token count as normaliser;
    clip the global grad norm; AdamW step. Returns (final state dict, pre-update entropy stats).
    """
    model = hf_model_with(model_path).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tokens, attn, mask = batch.tokens, batch.attention_mask, batch.response_mask[:, 1:]
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=attn).logits[:, :-1]
        old = alg.token_logprobs(logits, tokens[:, 1:])
        ent = alg.exact_entropy(logits)
    grpo = mask * (~batch.is_regularizer).unsqueeze(1)
    reg = mask * batch.is_regularizer.unsqueeze(1)
    entropy = {
        "entropy": float(alg.masked_mean(ent, grpo)),
        "entropy_regularizer": float(alg.masked_mean(ent, reg)),
        "entropy_sampled": float(alg.sampled_entropy_estimate(old, grpo)),
        "entropy_sampled_batch": float(alg.sampled_entropy_estimate(old, mask)),
    }
    per = len(batch) // cfg.mini_batches
    for k in range(cfg.mini_batches):
        r = slice(k * per, (k + 1) * per)
        logp = alg.token_logprobs(model(input_ids=tokens[r], attention_mask=attn[r]).logits[:, :-1], tokens[r, 1:])
        normalizer = alg.loss_token_count(algo, mask[r], batch.is_regularizer[r])
        loss, _ = alg.policy_loss(
            algo, logp=logp, old_logp=old[r], advantages=batch.advantages[r], mask=mask[r],
            is_regularizer=batch.is_regularizer[r], normalizer=normalizer,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, entropy


@pytest.fixture(scope="module")
def group(ray_local, tiny_model_path):
    g = LearnerGroup(tiny_model_path, CFG, ALGO, seed=0)
    yield g
    g.shutdown()


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_shards_keep_the_mini_batch_structure_and_pad_with_inert_rows():
    batch = make_batch(rows=10)
    shards = shard_batch(batch, world_size=2, mini_batches=2)
    # mini-batches are rows 0-4 and 5-9; ceil(5 / 2) = 3 rows per rank per mini-batch, so
    # rank 0 gets rows 0-2 and 5-7, rank 1 gets rows 3, 4, dummy and 8, 9, dummy
    assert [len(s) for s in shards] == [6, 6]
    assert torch.equal(shards[0].tokens, batch.tokens[[0, 1, 2, 5, 6, 7]])
    assert torch.equal(shards[1].tokens[[0, 1, 3, 4]], batch.tokens[[3, 4, 8, 9]])
    dummies = shards[1].select([2, 5])
    assert dummies.response_mask.sum() == 0 and dummies.advantages.abs().sum() == 0
    assert not dummies.is_regularizer.any()


def test_two_fsdp_learners_end_where_the_single_process_update_ends(group, tiny_model_path):
    """Same parameters after one update (2 mini-batches = 2 AdamW steps, micro-batches of 2).

    Tolerance 1e-5 absolute in float32. The two computations sum the same terms in different
    orders (micro-batches, ranks, truncated widths): gradients differ by float rounding only, but
    Adam divides each coordinate by its own RMS, so a coordinate whose gradient is ~0 in both
    (rounding noise) can still move by a fraction of lr = 1e-4. Measured: 2e-6 max (1.7e-6 with
    one micro-batch per rank); a real error (a wrong normaliser, a lost rank) moves whole
    tensors by ~lr, and the weights do move by more than 1e-5.
    """
    batch = make_batch()
    want, want_entropy = reference_update(tiny_model_path, CFG, ALGO, batch)
    stats = group.update(batch)
    got = group.get_full_state_dict()
    assert max_abs_diff(got, want) < 1e-5
    initial = hf_model_with(tiny_model_path).state_dict()
    assert max_abs_diff(got, initial) > 1e-5  # and the update did move the weights
    for key, value in want_entropy.items():
        assert stats[key] == pytest.approx(value, abs=1e-5), key
    # tokens: grpo = response tokens of rows 2..9, reg = rows 0..1 (dummy rows add none)
    mask = batch.response_mask
    assert stats["grpo_tokens"] == float(mask[2:].sum()) and stats["reg_tokens"] == float(mask[:2].sum())
    assert stats["optimizer_steps"] == 2 and stats["grad_norm"] > 0 and stats["tokens_per_s"] > 0
    assert 0 <= stats["clipfrac"] <= 1 and stats["approx_kl"] >= 0


def test_learner_logprobs_match_a_direct_forward_pass(group, tiny_model_path):
    batch = make_batch(rows=5, seed=1)
    got = group.compute_logprobs(batch)
    model = hf_model_with(tiny_model_path, group.get_full_state_dict())
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        want = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    valid = batch.attention_mask[:, 1:].bool()
    assert got.shape == batch.tokens.shape and torch.all(got[:, 0] == 0)
    assert float((got[:, 1:] - want)[valid].abs().max()) < 1e-5


def test_a_checkpoint_restores_model_and_optimizer(group, tmp_path):
    """save -> update (W_a) -> load -> the same update again (W_b): W_a == W_b only if AdamW's
    moments came back too (this is the group's second update, so the moments are non-zero)."""
    group.save_checkpoint(str(tmp_path / "ckpt"))
    saved = group.get_full_state_dict()
    batch = make_batch(seed=2)
    group.update(batch)
    after_a = group.get_full_state_dict()
    group.load_checkpoint(str(tmp_path / "ckpt"))
    assert max_abs_diff(group.get_full_state_dict(), saved) == 0.0
    group.update(batch)
    assert max_abs_diff(group.get_full_state_dict(), after_a) < 1e-6


def test_the_driver_batch_of_samples_is_accepted(group):
    from services.contracts import Sample
    from services.loop.steps import update_batch

    rows = [Sample("p0", [1, 5, 6], [8, 2], "stop", 1.0, 0, "hf"), Sample("p1", [1, 7], [9, 9, 2], "stop", 1.0, 0, "hf"),
            Sample("p1", [1, 7], [9, 2], "stop", 1.2, 0, "hf")]
    stats = group.update(update_batch(rows, [0.5, -0.5, 1.0], [False, False, True], pad_id=0))
    assert stats["grpo_tokens"] == 5 and stats["reg_tokens"] == 2 and stats["reg_selected"] == 1


@pytest.mark.parametrize(
    "algo",
    [GRPOConfig(), AEPOConfig(mode="append"), EntropyRegConfig(), EntropyAdvConfig(), ClipCovConfig(), KLCovConfig()],
    ids=lambda a: f"{a.type}-{getattr(a, 'mode', '')}",
)
def test_every_loss_variant_takes_a_finite_step_on_one_in_process_rank(tiny_model_path, algo):
    """World size 1 in this process (gloo), to cover every variant without an actor start each."""
    batch = make_batch(rows=6, n_reg=2 if isinstance(algo, AEPOConfig) else 0, seed=3)
    cfg = LearnerConfig(num_workers=1, cpus_per_worker=2, micro_batch_size=4)
    worker = LearnerWorker(0, 1, tiny_model_path, cfg, algo, seed=0)
    worker.setup("127.0.0.1", free_port())
    try:
        stats = worker.update(batch)
    finally:
        worker.shutdown()
    assert stats["optimizer_steps"] == 1 and all(v == v for k, v in stats.items() if k != "entropy_regularizer")
    if isinstance(algo, EntropyRegConfig):
        # the bonus is beta * token-mean entropy: 0.015 * ~3.1 nats at random init
        assert stats["entropy_bonus"] == pytest.approx(algo.beta * stats["entropy"], rel=1e-4)
    if isinstance(algo, AEPOConfig):
        assert stats["reg_loss"] != 0 and stats["reg_tokens"] > 0


def assert_same_update(stats_a, weights_a, stats_b, weights_b) -> None:
    """Two one-rank updates that must agree: weights within 2e-6, losses and entropy stats within 1e-5.
    (AdamW's first step is lr x g / (|g| + eps): float rounding in a gradient entry near 0 moves its
    weight by up to a few % of lr = 1e-4, whichever of two equal computations made it.)"""
    assert max_abs_diff(weights_a, weights_b) < 2e-6
    for key in ("entropy", "entropy_regularizer", "entropy_sampled", "pg_loss", "reg_loss", "grad_norm"):
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-5, abs=1e-7), key


def _one_rank_update(path, cfg, algo, batch):
    worker = LearnerWorker(0, 1, path, cfg, algo, seed=0)
    worker.setup("127.0.0.1", free_port())
    try:
        stats = worker.update(batch)
        weights = {k: v.clone() for k, v in worker.full_state_dict().items()}
    finally:
        worker.shutdown()
    return stats, weights


def test_fused_scoring_equals_a_separate_scoring_pass(tiny_model_path):
    """One mini-batch: old log-probs and entropy from the training forward give the same update and
    the same entropy statistics as the eval-mode scoring pass they replace."""
    batch = make_batch(rows=8, n_reg=2, seed=4)
    base = dict(num_workers=1, cpus_per_worker=2, micro_batch_size=3, mini_batches=1)
    algo = AEPOConfig(mode="replace", coef=1.0)
    fused, w_fused = _one_rank_update(tiny_model_path, LearnerConfig(**base, fuse_scoring=True), algo, batch)
    plain, w_plain = _one_rank_update(tiny_model_path, LearnerConfig(**base, fuse_scoring=False), algo, batch)
    assert_same_update(fused, w_fused, plain, w_plain)
    assert fused["token_entropy"] == pytest.approx(plain["token_entropy"], rel=1e-5)


def test_entropy_decomposition_adds_up_to_the_mean(tiny_model_path):
    """irrelevant + content = the GRPO token-mean entropy; forking tokens carry more than their
    share; the position profile's token-weighted mean is the mean again."""
    batch = make_batch(rows=8, n_reg=2, seed=5)
    cfg = LearnerConfig(num_workers=1, cpus_per_worker=2, micro_batch_size=4,
                        entropy_analysis={"irrelevant_tokens": [" "], "position_bucket": 2, "position_buckets": 4})
    stats, _ = _one_rank_update(tiny_model_path, cfg, AEPOConfig(mode="replace"), batch)
    te, h = stats["token_entropy"], stats["entropy"]
    assert te["irrelevant"] > 0 and te["content"] > 0
    assert te["irrelevant"] + te["content"] == pytest.approx(h, rel=1e-6)
    assert stats["entropy_irrelevant_share"] == pytest.approx(te["irrelevant"] / h, rel=1e-6)
    assert te["forking"] > h > te["nonforking"] and stats["entropy_forking_share"] > 0.2
    # rows 2..7 are GRPO rows; their response positions, bucketed by 2 into 4 buckets
    mask = batch.response_mask[2:, 1:]
    pos = (mask.cumsum(-1) - 1)[mask > 0]
    counts = torch.bincount((pos.long() // 2).clamp(max=3), minlength=4).double()
    prof = torch.tensor([v if v is not None else 0.0 for v in stats["entropy_by_position"]], dtype=torch.float64)
    assert len(prof) == 4 and float((prof * counts).sum() / counts.sum()) == pytest.approx(h, rel=1e-6)


def test_an_unknown_irrelevant_token_is_a_clear_error(tiny_model_path):
    cfg = LearnerConfig(num_workers=1, cpus_per_worker=2, entropy_analysis={"irrelevant_tokens": ["<nope>"]})
    worker = LearnerWorker(0, 1, tiny_model_path, cfg, GRPOConfig(), seed=0)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        worker.setup("127.0.0.1", free_port())
    worker.shutdown()


def test_two_fsdp_learners_with_fused_scoring_match_the_single_process_update(ray_local, tiny_model_path):
    """The on-policy path (one mini-batch: no separate scoring pass) across 2 ranks, micro-batches of 2."""
    stats = assert_group_update_matches_reference(tiny_model_path, CFG.model_copy(update={"mini_batches": 1}), make_batch(seed=6))
    assert stats["optimizer_steps"] == 1


def assert_group_update_matches_reference(model_path, cfg, batch) -> dict:
    """A fresh 2-rank LearnerGroup's update of `batch` ends at reference_update's weights (1e-5)
    with its pre-update entropy statistics; returns the group's stats."""
    want, want_entropy = reference_update(model_path, cfg, ALGO, batch)
    g = LearnerGroup(model_path, cfg, ALGO, seed=0)
    try:
        stats = g.update(batch)
        got = g.get_full_state_dict()
    finally:
        g.shutdown()
    assert max_abs_diff(got, want) < 1e-5
    for key, value in want_entropy.items():
        assert stats[key] == pytest.approx(value, abs=1e-5), key
    return stats


@pytest.mark.parametrize("bucket_bytes", [1, 200_000, 1 << 30])  # one parameter per bucket, a few, all in one
def test_the_flat_weight_gather_equals_torchs_full_state_dict(group, bucket_bytes):
    """Bit-identical tensors under the same keys (tied lm_head included), on every rank."""
    import ray

    # defined here so that Ray ships them by value (the workers cannot import this test module)
    def _torch_full_state(worker):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _flat_full_state(worker, bucket_bytes):
        from services.learner.gather import gather_full_state

        return gather_full_state(worker.model, bucket_bytes)

    want = ray.get([w.__ray_call__.remote(_torch_full_state) for w in group.workers])
    got = ray.get([w.__ray_call__.remote(_flat_full_state, bucket_bytes) for w in group.workers])
    want = want[0]  # torch's cpu_offload gather fills rank 0 only; the flat one fills every rank
    assert want and all(g is not None and list(g) == list(want) for g in got)
    for g in got:
        for key in want:
            assert g[key].shape == want[key].shape and torch.equal(g[key], want[key]), key
    # an uneven split is covered: the embedding's rows (the vocabulary, 23) do not halve
    assert want["model.embed_tokens.weight"].shape[0] % 2 == 1


def test_length_order_sorts_inside_each_mini_batch_only():
    from services.learner.batch import length_order

    lengths = torch.tensor([5, 3, 9, 3, 7, 1, 4, 2])
    assert length_order(lengths, 1).tolist() == [5, 7, 1, 3, 6, 0, 4, 2]
    # two mini-batches: rows 0-3 and 4-7 keep to their halves
    assert length_order(lengths, 2).tolist() == [1, 3, 0, 2, 5, 7, 6, 4]
    # 7 rows in 2 mini-batches: rows 0-3 and 4-6, as shard_batch cuts them; no row is dropped
    assert length_order(lengths[:7], 2).tolist() == [1, 3, 0, 2, 5, 6, 4]


def test_sorting_rows_by_length_leaves_the_update_unchanged(tiny_model_path):
    """Micro-batches of 3 over 8 rows of mixed lengths, sorted or in the given order: same weights,
    same statistics (the loss is a token sum over the mini-batch; only the padding differs)."""
    batch = make_batch(rows=8, n_reg=2, seed=7)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 2
    base = dict(num_workers=1, cpus_per_worker=2, micro_batch_size=3, mini_batches=1)
    algo = AEPOConfig(mode="replace", coef=1.0)
    a, wa = _one_rank_update(tiny_model_path, LearnerConfig(**base, sort_by_length=True), algo, batch)
    b, wb = _one_rank_update(tiny_model_path, LearnerConfig(**base, sort_by_length=False), algo, batch)
    assert_same_update(a, wa, b, wb)
    assert [x is None for x in a["entropy_by_position"]] == [x is None for x in b["entropy_by_position"]]
    assert [x for x in a["entropy_by_position"] if x is not None] == pytest.approx(
        [x for x in b["entropy_by_position"] if x is not None], rel=1e-5)
    assert a["tokens"] == b["tokens"]  # real tokens, not padding


def make_grouped_batch(groups: int = 3, g: int = 4, n_reg: int = 2, seed: int = 0) -> TrainBatch:
    """GRPO-shaped rows: `groups` prompts (different lengths) x `g` responses each, the first
    `n_reg` rows regularizer samples of prompt 0 placed apart from its group."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(4, 23, (3 + k,), generator=gen).tolist() for k in range(groups)]
    rows_p, rows_r = [], []
    for k in [0] * n_reg + [k for k in range(groups) for _ in range(g)]:
        rows_p.append(prompts[k])
        rows_r.append(torch.randint(4, 23, (int(torch.randint(1, 10, (), generator=gen)),), generator=gen).tolist() + [2])
    adv = torch.randn(len(rows_p), generator=gen)
    adv[:n_reg] = 1.0
    return TrainBatch.from_sequences(rows_p, rows_r, adv, [i < n_reg for i in range(len(rows_p))], pad_id=0)


def test_shared_prefix_logits_equal_the_joint_forward_at_every_response_position(tiny_model_path):
    """Prompts of different lengths, groups split across the batch, an inert dummy row: the
    prompt-once forward gives the joint forward's logits wherever a response token is predicted,
    and the gradients of a response-token loss agree too."""
    from services.learner.batch import prompt_lengths
    from services.learner.prefix import shared_prefix_logits

    batch = make_grouped_batch(seed=1).padded_to(15)  # row 14 is a dummy (copy of row 0, no response)
    model = hf_model_with(tiny_model_path).train()
    want = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    got = shared_prefix_logits(model, batch.tokens, batch.attention_mask, batch.response_mask)
    assert got is not None and got.shape == want.shape
    # position t predicts token t+1: the positions that matter are where response_mask[:, t+1] = 1
    where = batch.response_mask[:, 1:].bool()
    assert where.sum() > 20
    assert torch.allclose(got[:, :-1][where], want[:, :-1][where], atol=1e-5)
    assert torch.equal(prompt_lengths(batch.attention_mask, batch.response_mask)[:3], torch.tensor([4, 4, 4]))

    def loss_of(logits):
        logp = alg.token_logprobs(logits[:, :-1], batch.tokens[:, 1:])
        return -(logp * batch.response_mask[:, 1:] * batch.advantages.unsqueeze(1)).sum()

    grads = []
    for fn in (lambda: want, lambda: got):
        model.zero_grad()
        loss_of(fn()).backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0]) < 1e-4
    # distinct prompts only, and inert rows only: still exact, still the same two passes
    distinct = make_batch(rows=4, seed=2)
    got = shared_prefix_logits(model, distinct.tokens, distinct.attention_mask, distinct.response_mask)
    want = model(input_ids=distinct.tokens, attention_mask=distinct.attention_mask).logits
    where = distinct.response_mask[:, 1:].bool()
    assert torch.allclose(got[:, :-1][where], want[:, :-1][where], atol=1e-5)
    inert = distinct.padded_to(6).select(torch.tensor([4, 5]))
    assert inert.response_mask.sum() == 0
    assert shared_prefix_logits(model, inert.tokens, inert.attention_mask, inert.response_mask).shape[:2] == inert.tokens.shape


def test_prompt_order_groups_rows_by_prompt_inside_each_mini_batch():
    from services.learner.batch import prompt_order

    batch = make_grouped_batch(groups=2, g=2, n_reg=2)  # prompts: 0 0 | 0 0 1 1
    assert prompt_order(batch, 1).tolist() == [0, 1, 2, 3, 4, 5]
    swapped = batch.select(torch.tensor([4, 0, 5, 1, 2, 3]))  # 1 0 1 0 0 0
    assert prompt_order(swapped, 1).tolist() == [0, 2, 1, 3, 4, 5]
    assert prompt_order(swapped, 2).tolist() == [0, 2, 1, 3, 4, 5]  # halves [1 0 1] [0 0 0]
    mixed = batch.select(torch.tensor([0, 1, 2, 4, 3, 5]))  # 0 0 0 | 1 0 1: only the second half moves
    assert prompt_order(mixed, 2).tolist() == [0, 1, 2, 4, 3, 5]
    # 5 rows in 2 mini-batches ([1 0 1] [0 0]): a permutation of every row, never a truncation
    assert prompt_order(swapped.select(slice(0, 5)), 2).tolist() == [0, 2, 1, 3, 4]


def test_the_shared_prefix_update_equals_the_plain_one(tiny_model_path):
    """One rank, micro-batches of 5 over grouped rows: same weights and statistics with and without."""
    batch = make_grouped_batch(groups=3, g=4, n_reg=2, seed=3)
    base = dict(num_workers=1, cpus_per_worker=2, micro_batch_size=5, mini_batches=1)
    algo = AEPOConfig(mode="replace", coef=1.0)
    a, wa = _one_rank_update(tiny_model_path, LearnerConfig(**base, share_prefix=True), algo, batch)
    b, wb = _one_rank_update(tiny_model_path, LearnerConfig(**base, share_prefix=False), algo, batch)
    assert_same_update(a, wa, b, wb)


def test_two_fsdp_learners_sharing_prompts_match_the_single_process_update(ray_local, tiny_model_path):
    """FSDP2 with two forwards (prompts, then responses on their cache) per micro-batch, 2 ranks,
    2 mini-batches: the same weights and entropy as the plain single-process update."""
    assert CFG.share_prefix
    stats = assert_group_update_matches_reference(tiny_model_path, CFG, make_grouped_batch(groups=3, g=4, n_reg=2, seed=4))
    assert stats["optimizer_steps"] == 2


@pytest.mark.parametrize("hold", [True, False])
def test_holding_the_full_parameters_for_the_step_or_not_gives_the_reference_update(ray_local, tiny_model_path, hold):
    """hold_full_params (on by default on CPU: one all-gather and one reduce-scatter per layer per
    optimizer step) and the per-forward resharding both end at the reference weights, over 2
    mini-batches of several micro-batches; the weight gather and the scoring pass after the update
    see sharded parameters again either way."""
    cfg = CFG.model_copy(update={"hold_full_params": hold})
    batch = make_grouped_batch(groups=3, g=4, n_reg=2, seed=7)
    assert_group_update_matches_reference(tiny_model_path, cfg, batch)
    g = LearnerGroup(tiny_model_path, cfg, ALGO, seed=0)
    try:
        before = g.compute_logprobs(batch)
        g.update(batch)
        after = g.compute_logprobs(batch)
        weights = g.get_full_state_dict()
    finally:
        g.shutdown()
    want = hf_model_with(tiny_model_path, weights)
    with torch.no_grad():
        ref = alg.token_logprobs(want(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits[:, :-1],
                                 batch.tokens[:, 1:])
    mask = batch.attention_mask[:, 1:].bool()
    assert float((after[:, 1:] - ref).abs()[mask].max()) < 1e-5
    assert float((after[:, 1:] - before[:, 1:]).abs()[mask].max()) > 1e-6  # the update moved them


def test_the_controller_hears_exact_grpo_entropy_and_the_mixed_batch_sampled_estimate(tiny_model_path):
    """`controller.entropy_source: sampled` is the reference's signal: the sampled-token estimate over
    the whole mixed update batch (GRPO and regularizer rows), not over the GRPO rows only."""
    from controller.actor import ControllerCore, MemoryStore
    from controller.client import LocalControllerClient
    from services.config import ControllerConfig

    batch = make_batch(rows=8, n_reg=3, seed=5)
    core = ControllerCore(ALGO, ControllerConfig(), "publish-test", store=MemoryStore())
    worker = LearnerWorker(0, 1, tiny_model_path, LearnerConfig(num_workers=1, cpus_per_worker=2, micro_batch_size=4),
                           ALGO, seed=0)
    worker.setup("127.0.0.1", free_port())
    try:
        stats = worker.update(batch, step=7, controller=LocalControllerClient(core))
    finally:
        worker.shutdown()
    last = core.state()["last"]
    assert last["exact"]["step"] == last["sampled"]["step"] == 7
    assert last["exact"]["entropy"] == pytest.approx(stats["entropy"])
    assert last["sampled"]["entropy"] == pytest.approx(stats["entropy_sampled_batch"])
    # the two sampled estimates differ when regularizer rows are in the batch: the fix is visible
    assert stats["entropy_sampled_batch"] != pytest.approx(stats["entropy_sampled"], abs=1e-6)


def test_a_checkpoint_carries_clip_covs_generator_so_the_next_update_repeats_exactly(tiny_model_path, tmp_path):
    """Clip-Cov picks the tokens it detaches at random: the generator's position after the first
    update is part of the state. Worker A: update, save, update. Worker B: load, the same update.
    Bit-equal weights only if the generator came back (a fresh one would pick other tokens)."""
    algo = ClipCovConfig(clip_ratio=0.5, cov_lb=-1e6, cov_ub=1e6)  # every token a candidate: the random pick decides
    cfg = LearnerConfig(num_workers=1, cpus_per_worker=2, micro_batch_size=4)

    def worker():
        w = LearnerWorker(0, 1, tiny_model_path, cfg, algo, seed=0)
        w.setup("127.0.0.1", free_port())
        return w

    a = worker()
    try:
        a.update(make_batch(rows=6, n_reg=0, seed=3))
        written = a.save_checkpoint(str(tmp_path / "ckpt"))
        a.update(make_batch(rows=6, n_reg=0, seed=4))
        after_a = {k: v.clone() for k, v in a.full_state_dict().items()}
    finally:
        a.shutdown()
    assert "rng_rank0.pt" in written and ".metadata" in written and all(size > 0 for size in written.values())
    b = worker()
    try:
        b.load_checkpoint(str(tmp_path / "ckpt"))
        b.update(make_batch(rows=6, n_reg=0, seed=4))
        assert max_abs_diff(b.full_state_dict(), after_a) == 0.0
        fresh = torch.Generator().manual_seed(0)
        b.load_checkpoint(str(tmp_path / "ckpt"))
        assert not torch.equal(b.generator.get_state(), fresh.get_state())  # it was advanced, and restored
    finally:
        b.shutdown()
