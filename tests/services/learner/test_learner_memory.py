"""Memory that fits: the chunked LM head, activation checkpointing and token-budget micro-batches
give the plain path's gradients and updates (CI-sized shapes: vocabulary 5000, hidden 64, 64 tokens)."""

from __future__ import annotations

import pytest
import torch
from services.backends.network import free_port

from services import algorithm as alg
from services.config import AdaptiveEntropyConfig, AEPOConfig, EntropyRegConfig, LearnerConfig
from services.learner.batch import TrainBatch, micro_batches, shard_for_ranks, token_budget_bounds
from services.learner.forward import ForwardSpec, token_outputs
from services.learner.head import head_outputs
from services.learner.worker import LearnerWorker

V, SEQ = 5000, 64
IRRELEVANT = (3, 17, 4999)


def small_qwen(tied: bool = True, seed: int = 0):
    """A random Qwen2 at CI size; tied (Qwen2.5-0.5B's layout) or with its own head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2 * SEQ, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).float().train()


def seq_batch(seed: int = 0) -> TrainBatch:
    """3 rows up to SEQ tokens, rows 0 and 1 share their prompt; 120 response tokens in all."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, V, (6,), generator=g).tolist()
    prompts = [prompt, prompt, torch.randint(1, V, (9,), generator=g).tolist()]
    responses = [torch.randint(1, V, (n,), generator=g).tolist() for n in (58, 40, 22)]
    return TrainBatch.from_sequences(prompts, responses, [0.8, -1.1, 0.4], [False] * 3, pad_id=0)


def loss_grads(model, batch: TrainBatch, spec: ForwardSpec, algo, levers: dict, temperature: float):
    """Gradients of the policy loss (entropy term included) and the forward's outputs."""
    model.zero_grad(set_to_none=True)
    out = token_outputs(model, batch, spec, temperature=temperature, loss_entropy=True, observe=True)
    mask = batch.response_mask[:, 1 : out.width]
    noise = torch.randn(out.logp.shape, generator=torch.Generator().manual_seed(1))
    loss, _ = alg.policy_loss(algo, logp=out.logp, old_logp=out.logp.detach() + 0.1 * noise, advantages=batch.advantages,
                              mask=mask, is_regularizer=batch.is_regularizer, normalizer=float(mask.sum()),
                              entropy=out.entropy, levers=levers)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, out


def assert_close_grads(got: dict, want: dict, rel: float = 1e-5) -> None:
    for name, g in want.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        assert float((got[name] - g).abs().max()) <= rel * scale, name


@pytest.mark.parametrize("chunk", [40, 7, 8, 4096])  # 120 positions: 40 and 8 divide it, 7 does not, 4096 is one chunk
@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("algo,levers", [(EntropyRegConfig(beta=0.5), {}),
                                         (AdaptiveEntropyConfig(), {"entropy_coef": 0.3})], ids=["entropy_reg", "adaptive"])
def test_the_chunked_head_gives_the_plain_paths_gradient_with_the_entropy_in_the_loss(chunk, temperature, algo, levers):
    batch = seq_batch()
    assert int(batch.response_mask[:, 1:].sum()) == 120
    model = small_qwen()
    want, ref = loss_grads(model, batch, ForwardSpec(False, False, 4096, IRRELEVANT), algo, levers, temperature)
    got, out = loss_grads(model, batch, ForwardSpec(True, False, chunk, IRRELEVANT), algo, levers, temperature)
    assert_close_grads(got, want)
    where = batch.response_mask[:, 1:].bool()
    for a, b in ((out.logp, ref.logp), (out.entropy, ref.entropy), (out.observed, ref.observed),
                 (out.irrelevant, ref.irrelevant)):
        assert torch.allclose(a[where], b[where], rtol=1e-5, atol=1e-5)  # irrelevant = H - content: H's rounding
    assert float(out.irrelevant[where].min()) >= 0 and float(out.irrelevant[where].max()) > 0


@pytest.mark.parametrize("tied", [True, False])
def test_the_chunked_head_on_the_shared_prefix_forward_and_an_untied_head(tied):
    """Each prompt once (prefix.py) with the chunked head: the plain joint forward's gradients."""
    batch = seq_batch(seed=2)
    model = small_qwen(tied=tied)
    algo = EntropyRegConfig(beta=0.5)
    want, _ = loss_grads(model, batch, ForwardSpec(False, False, 4096), algo, {}, 1.0)
    got, _ = loss_grads(model, batch, ForwardSpec(True, True, 16), algo, {}, 1.0)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert "lm_head.weight" in got
    assert_close_grads(got, want, rel=1e-4)


def test_checkpointed_layers_recompute_and_give_the_same_gradient_through_the_chunked_head():
    batch = seq_batch(seed=3)
    model = small_qwen()
    algo = AdaptiveEntropyConfig()
    want, _ = loss_grads(model, batch, ForwardSpec(False, False, 4096), algo, {"entropy_coef": 0.2}, 1.0)
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute stops early
    model.gradient_checkpointing_enable()
    got, _ = loss_grads(model, batch, ForwardSpec(True, False, 32), algo, {"entropy_coef": 0.2}, 1.0)
    assert len(calls) == 2  # the forward, and its recompute in the backward
    assert_close_grads(got, want)


def test_the_head_computes_only_the_positions_asked_for_and_no_gradient_flows_from_the_rest():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5))
    positions = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    lp, ent, irr = head_outputs(h, w, tokens, positions, 0.7, chunk_size=3, with_entropy=True)
    assert irr is None and torch.all(lp[positions == 0] == 0) and torch.all(ent[positions == 0] == 0)
    (lp.sum() + ent.sum()).backward()
    assert torch.all(h.grad[positions == 0] == 0) and float(h.grad[positions == 1].abs().min()) > 0
    want_lp, want_ent = alg.token_logprobs_and_entropy(h.detach() @ w.detach().T, tokens, 0.7)
    assert torch.allclose(lp[positions == 1], want_lp[positions == 1], atol=1e-6)
    assert torch.allclose(ent[positions == 1], want_ent[positions == 1], atol=1e-6)


def test_token_budget_bounds_cut_by_padded_tokens():
    assert token_budget_bounds([3, 4, 5, 9, 20], 12) == [0, 2, 3, 4, 5]  # 2 x 4, 1 x 5 (2 x 9 > 12), 9, 20 alone
    assert token_budget_bounds([2, 2, 2, 2], 8) == [0, 4]
    assert token_budget_bounds([], 8) == [0]
    batch = seq_batch()
    sizes = [len(mb) for mb in micro_batches(batch, 1, max_tokens=2 * SEQ)]
    assert sum(sizes) == len(batch) and sizes == [2, 1]  # rows of 64, 46, 31 tokens: 2 x 64 fits, then 31


def _one_rank(path: str, cfg: LearnerConfig, algo, batch: TrainBatch, levers: dict | None = None):
    worker = LearnerWorker(0, 1, path, cfg, algo, seed=0)
    worker.setup("127.0.0.1", free_port())
    try:
        stats = worker.update(batch, levers=levers)
        weights = {k: v.detach().clone() for k, v in worker.full_state_dict().items()}
    finally:
        worker.shutdown()
    return stats, weights


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _grouped_rows(seed: int = 0) -> TrainBatch:
    """12 rows, 3 prompts x 4 responses of 1..20 tokens, the first half long and the second short."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(4, 23, (3 + k,), generator=g).tolist() for k in range(3)]
    rows_p = [prompts[k] for k in range(3) for _ in range(4)]
    rows_r = [torch.randint(4, 23, (20 - 3 * (i // 2) if i < 6 else 1 + i % 3,), generator=g).tolist() + [2] for i in range(12)]
    adv = torch.randn(12, generator=g)
    return TrainBatch.from_sequences(rows_p, rows_r, adv, [False] * 12, pad_id=0)


def test_a_token_budget_gives_the_fixed_size_update_on_one_rank(tiny_model_path):
    batch = _grouped_rows()
    base = dict(num_workers=1, cpus_per_worker=2, micro_batch_size=4, mini_batches=1, share_prefix=False, chunked_head=False)
    algo = EntropyRegConfig(beta=0.2)
    budget = LearnerConfig(**base).model_copy(update={"max_tokens_per_micro_batch": 60})
    assert len(micro_batches(batch, 4, 60)) not in (1, len(micro_batches(batch, 4)))
    a, wa = _one_rank(tiny_model_path, LearnerConfig(**base), algo, batch)
    b, wb = _one_rank(tiny_model_path, budget, algo, batch)
    assert _max_diff(wa, wb) < 2e-6
    for key in ("entropy", "pg_loss", "entropy_bonus", "grad_norm", "tokens"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("hold,checkpointing", [(False, False), (True, True)], ids=["per-forward-gathers+prefix", "held+checkpointed"])
def test_two_fsdp_ranks_with_the_chunked_head_and_a_token_budget_match_the_plain_update(
        ray_local, tiny_model_path, hold, checkpointing):
    """FSDP2 on 2 ranks (gloo): chunked head, token budget with a different micro-batch count on each
    rank (the short rank runs inert micro-batches), per-forward gathers with the shared prefix, or
    held parameters with checkpointed layers: the plain single-rank update's weights and entropy."""
    from services.learner.group import LearnerGroup

    batch = _grouped_rows(seed=1)
    algo = AdaptiveEntropyConfig()
    levers = {"entropy_coef": 0.1}
    plain = LearnerConfig(num_workers=1, cpus_per_worker=2, micro_batch_size=12, mini_batches=1, chunked_head=False,
                          share_prefix=False)
    want_stats, want = _one_rank(tiny_model_path, plain, algo, batch, levers)
    cfg = LearnerConfig(num_workers=2, cpus_per_worker=0.25, mini_batches=1, chunked_head=True, entropy_chunk_size=16,
                        max_tokens_per_micro_batch=45, hold_full_params=hold, gradient_checkpointing=checkpointing)
    shards = shard_for_ranks(batch, 2, cfg)
    counts = [len(micro_batches(s, cfg.micro_batch_size, 45)) for s in shards]
    assert counts[0] != counts[1], counts
    g = LearnerGroup(tiny_model_path, cfg, algo, seed=0)
    try:
        stats = g.update(batch, levers=levers)
        got = g.get_full_state_dict()
    finally:
        g.shutdown()
    assert _max_diff(got, want) < 1e-5
    for key in ("entropy", "entropy_sampled", "grad_norm"):
        assert stats[key] == pytest.approx(want_stats[key], rel=1e-4), key


def test_the_plan_cuts_a_token_budget_into_micro_batches_of_full_length_rows():
    from pathlib import Path

    from services.cli.config_file import load_config
    from services.model.plan_memory import learner_layout

    cfg = load_config(Path(__file__).resolve().parents[3] / "deploy/configs/cpu_default.yaml")
    fixed = learner_layout(cfg, 1, 30)
    budget = learner_layout(cfg.model_copy(update={"learner": cfg.learner.model_copy(
        update={"max_tokens_per_micro_batch": 100})}), 1, 30)
    assert fixed.rows == budget.rows > 3 and budget.micro == 3 and budget.micro_batches == -(-budget.rows // 3)
    tiny = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"max_tokens_per_micro_batch": 10})})
    assert learner_layout(tiny, 1, 30).micro == 1  # a row longer than the budget runs alone


def test_in_bf16_the_chunked_head_keeps_the_plain_paths_values_and_float32s_gradient_within_bf16_rounding():
    """FSDP's bf16 mixed precision (GPU): hidden states and head in bf16, softmax in float32."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 40, 64, generator=g), 0.1 * torch.randn(3000, 64, generator=g)
    tokens = torch.randint(0, 3000, (2, 40), generator=g)
    g1, g2 = torch.randn(2, 40, generator=g), torch.randn(2, 40, generator=g)

    def run(chunked: bool, dtype):
        h, w = hidden.to(torch.bfloat16).to(dtype).requires_grad_(), weight.to(torch.bfloat16).to(dtype).requires_grad_()
        if chunked:
            lp, ent, _ = head_outputs(h, w, tokens, torch.ones(2, 40), 1.0, 16, True)
        else:
            lp, ent = alg.token_logprobs_and_entropy(h @ w.T, tokens, 1.0, 4096, True)
        (lp * g1 + ent * g2).sum().backward()
        return lp.detach(), ent.detach(), h.grad.float(), w.grad.float()

    want = run(False, torch.float32)
    plain, chunked = run(False, torch.bfloat16), run(True, torch.bfloat16)
    assert torch.equal(chunked[0], plain[0]) and torch.equal(chunked[1], plain[1])
    for got in (plain, chunked):
        for a, b in zip(got[2:], want[2:]):
            assert float((a - b).abs().max() / b.abs().max()) < 1e-2


# ------------------------------------------------------------------ padding removal (packing.py)


def test_two_rows_pack_into_one_sequence_and_unpack_to_the_row_layout():
    from services.learner.packing import pack, packed_rows, unpack

    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    p = pack(tokens, (tokens != 0).long())
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9]] and p.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # row 0's positions 0, 1 predict 6, 7 (packed 0, 1); row 1's position 0 predicts 9 (packed 3)
    assert p.valid.tolist() == [[True, True, False], [True, False, False]]
    assert p.index[p.valid].tolist() == [0, 1, 3]
    values = torch.tensor([[10.0, 11.0, 12.0, 13.0]])  # packed positions 0..3 (position 2 predicts across rows)
    assert unpack(values, p).tolist() == [[10.0, 11.0, 0.0], [13.0, 0.0, 0.0]]
    assert packed_rows(values.unsqueeze(-1), p, torch.tensor([[0, 1, 0], [1, 0, 0]]))[:, 0].tolist() == [11.0, 13.0]
    with pytest.raises(ValueError, match="past its row's last token"):
        packed_rows(values, p, torch.tensor([[0, 0, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="right-padded"):
        pack(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]))


def test_a_packed_token_budget_counts_the_rows_own_tokens():
    assert token_budget_bounds([6, 2, 2, 2], 10) == [0, 1, 4]  # padded: 2 x 6 > 10; then 3 x 2
    assert token_budget_bounds([6, 2, 2, 2], 10, packed=True) == [0, 3, 4]  # 6 + 2 + 2 = 10, + 2 > 10


@pytest.mark.parametrize("chunked", [False, True], ids=["plain-head", "chunked-head"])
@pytest.mark.parametrize("all_positions", [False, True])
def test_packed_rows_give_the_padded_forwards_values_and_gradient(chunked, all_positions):
    """Three rows of 65, 47 and 32 tokens packed into 144: no row sees another (transformers' packed
    mask from the position ids), so every value read and the loss's gradient equal the padded path's."""
    batch = seq_batch(seed=4)
    model = small_qwen(tied=False)
    algo = EntropyRegConfig(beta=0.5)
    if all_positions:
        with torch.no_grad():
            ref = token_outputs(model, batch, ForwardSpec(chunked, False, 16, IRRELEVANT), all_positions=True, observe=True)
            got = token_outputs(model, batch, ForwardSpec(chunked, False, 16, IRRELEVANT, packed=True), all_positions=True,
                                observe=True)
        where = batch.attention_mask[:, 1:].bool()
    else:
        want, ref = loss_grads(model, batch, ForwardSpec(chunked, False, 16, IRRELEVANT), algo, {}, 1.3)
        grads, got = loss_grads(model, batch, ForwardSpec(chunked, False, 16, IRRELEVANT, packed=True), algo, {}, 1.3)
        assert_close_grads(grads, want, rel=1e-4)
        where = batch.response_mask[:, 1:].bool()
    assert got.width == ref.width
    for a, b in ((got.logp, ref.logp), (got.observed, ref.observed), (got.irrelevant, ref.irrelevant)):
        assert torch.allclose(a[where], b[where], rtol=1e-5, atol=1e-5)
    if not chunked:  # the plain path's unread padding positions hold the model's values; packed, zeros
        assert float(got.logp.detach()[~batch.attention_mask[:, 1:].bool()].abs().max()) == 0.0


@pytest.mark.parametrize("budget", [None, 60])
def test_remove_padding_gives_the_padded_update_on_one_rank(tiny_model_path, budget):
    batch = _grouped_rows(seed=2)
    base = dict(num_workers=1, cpus_per_worker=2, micro_batch_size=4, mini_batches=1, share_prefix=False, chunked_head=True,
                entropy_chunk_size=16)
    algo = AdaptiveEntropyConfig()
    packed = LearnerConfig(**base).model_copy(update={"remove_padding": True, "max_tokens_per_micro_batch": budget})
    a, wa = _one_rank(tiny_model_path, LearnerConfig(**base), algo, batch, {"entropy_coef": 0.1})
    b, wb = _one_rank(tiny_model_path, packed, algo, batch, {"entropy_coef": 0.1})
    assert _max_diff(wa, wb) < 2e-6
    for key in ("entropy", "pg_loss", "entropy_bonus", "grad_norm", "tokens"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
