"""Learner -> rollout weight sync through Ray: a LearnerGroup (2 FSDP ranks) and a RolloutPool
(2 hf actors) in the session's local Ray."""

from __future__ import annotations

import pytest
import torch
from reference_decoding import hf_model_with, reference_greedy

from services.config import GRPOConfig, LearnerConfig, RolloutConfig
from services.learner.batch import TrainBatch
from services.learner.group import LearnerGroup
from services.model.tiny import encode_prompt
from services.rollout.pool import RolloutPool
from services.rollout.pool import _split
from services.rollout.service import SamplingRequest

PROMPTS = ["9,8,3>69|", "1,2,3>6|", "4,5,6>120|", "7,7,7>1|", "2,3>5|"]


@pytest.fixture(scope="module")
def pool(ray_local, tiny_model_path):
    p = RolloutPool(tiny_model_path, RolloutConfig(engine="hf", num_actors=2, cpus_per_actor=0.25, max_tokens=10), seed=0)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def group(ray_local, tiny_model_path):
    cfg = LearnerConfig(num_workers=2, cpus_per_worker=0.25, lr=3e-3, micro_batch_size=8)
    g = LearnerGroup(tiny_model_path, cfg, GRPOConfig(), seed=0)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [(i, encode_prompt(tokenizer, t)) for i, t in enumerate(PROMPTS)]


def test_split_gives_near_equal_contiguous_chunks_in_order():
    assert _split(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert _split(list(range(2)), 3) == [[0], [1], []]


def test_the_pool_keeps_request_and_prompt_order_across_actors(pool, prompts):
    result = pool.generate_many([SamplingRequest(prompts, 2, 1.0), SamplingRequest(prompts[:1], 3, 0.7)], seed=0)
    assert [s.prompt for s in result.samples[0]] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [s.prompt for s in result.samples[1]] == [0, 0, 0]
    assert {s.temperature for s in result.samples[1]} == {0.7}
    assert result.stats["gen_tokens"] == sum(len(s.response_ids) for g in result.samples for s in g)


def test_after_a_sync_the_engines_decode_like_the_learners_model(pool, group, prompts, tiny_model_path, tokenizer):
    """Update the learners, push their weights, then: greedy output of every rollout actor ==
    greedy output of an HF model holding the learners' full state dict; samples carry version 1;
    the learners' log-probs of those samples == a direct forward pass of that model."""
    before = pool.generate(prompts, 1, 0.0)
    # a batch that rewards the first greedy responses and penalises a second set: weights move a lot
    rows = [s for s in pool.generate(prompts, 2, 1.0, seed=1)]
    batch = TrainBatch.from_sequences(
        [s.prompt_ids for s in rows], [s.response_ids for s in rows],
        [1.0 if i % 2 == 0 else -1.0 for i in range(len(rows))], [False] * len(rows), tokenizer.pad_token_id,
    )
    for _ in range(3):
        group.update(batch)
    ref = group.state_dict_ref()
    sync = pool.load_weights(1, ref)
    assert sync["policy_version"] == 1 and 0 <= sync["engine_sync_s"] <= sync["sync_s"]

    learner_model = hf_model_with(tiny_model_path, group.get_full_state_dict())
    after = pool.generate(prompts, 1, 0.0)
    want = [reference_greedy(learner_model, ids, 10, tokenizer.eos_token_id) for _, ids in prompts]
    assert [s.response_ids for s in after] == want
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    assert {s.policy_version for s in after} == {1}

    sampled = pool.generate(prompts, 2, 1.0, seed=5)
    probe = TrainBatch.from_sequences(
        [s.prompt_ids for s in sampled], [s.response_ids for s in sampled], [0.0] * len(sampled),
        [False] * len(sampled), tokenizer.pad_token_id,
    )
    got = group.compute_logprobs(probe)
    with torch.no_grad():
        logits = learner_model(input_ids=probe.tokens, attention_mask=probe.attention_mask).logits
    direct = torch.log_softmax(logits[:, :-1], -1).gather(-1, probe.tokens[:, 1:, None])[..., 0]
    resp = probe.response_mask[:, 1:].bool()
    assert float((got[:, 1:] - direct)[resp].abs().max()) < 1e-5


def test_state_dicts_cross_the_wire_as_numpy_and_come_back_bit_for_bit():
    """to_wire: CPU tensors become numpy views (no copy), bf16 (no numpy twin) stays a tensor;
    from_wire gives the same values and dtypes back, also from read-only buffers like Ray's."""
    import numpy as np

    from services.backends.wire import from_wire, to_wire

    state = {
        "w": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.int64), "h": torch.randn(2, dtype=torch.float16),
        "bf": torch.randn(3).to(torch.bfloat16), "t": torch.randn(4, 2).t(),  # non-contiguous
    }
    wire = to_wire(state)
    assert isinstance(wire["w"], np.ndarray) and np.shares_memory(wire["w"], state["w"].numpy())
    assert isinstance(wire["bf"], torch.Tensor)
    for v in wire.values():  # the object store hands out read-only views
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    back = from_wire(wire)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert to_wire(None) is None
