"""Learner -> rollout weight sync through Ray: a LearnerGroup (2 FSDP ranks) and a RolloutPool
(2 hf actors) in the session's local Ray; the bucketed sync, a revived actor's re-sync from the
kept bucket refs, and buckets that outlive their learners (the format itself: test_sync_buckets.py)."""

from __future__ import annotations

import pytest
import torch
from reference_decoding import hf_model_with, reference_greedy

from services.backends.weight_buckets import BucketedWeights
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


def test_after_a_sync_the_engines_decode_like_the_learners_model(ray_local, pool, group, prompts, tiny_model_path, tokenizer):
    """The sync is the bucketed one (`weight_buckets`: refs the driver passes on unresolved). Update the learners, push their weights, then: greedy output of every rollout actor ==
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
    handle = group.weight_buckets()
    assert isinstance(handle, BucketedWeights) and handle.buckets
    assert all(isinstance(ref, ray_local.ObjectRef) for ref in handle.buckets)  # refs only: the driver holds no tensor
    assert handle.manifest["dtype"] == "float32" and handle.manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    sync = pool.load_weights(1, handle)
    assert sync["policy_version"] == 1 and 0 <= sync["engine_sync_s"] <= sync["sync_s"]
    assert sync["sync_bytes"] == 2 * handle.nbytes  # each of the 2 actors fetched every bucket
    assert pool._weights is handle  # kept, to re-sync an actor that restarts

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


def _greedy_like(pool, prompts, weights, tiny_model_path, eos_id) -> None:
    model = hf_model_with(tiny_model_path, weights)
    want = [reference_greedy(model, ids, 10, eos_id) for _, ids in prompts]
    assert [s.response_ids for s in pool.generate(prompts, 1, 0.0)] == want


def test_a_killed_rollout_actor_is_revived_and_resynced_from_the_kept_bucket_refs(ray_local, pool, group, prompts,
                                                                                 tiny_model_path, tokenizer):
    """SIGKILL one actor after a bucketed sync: Ray restarts it on the checkpoint's weights, the pool
    re-syncs it from the bucket refs it kept, and its share is drawn again from the synced weights."""
    import os
    import signal

    weights = group.get_full_state_dict()
    pool.load_weights(pool.version + 1, group.weight_buckets())
    restarts = pool.restarts
    os.kill(pool.pids()[0], signal.SIGKILL)
    _greedy_like(pool, prompts, weights, tiny_model_path, tokenizer.eos_token_id)
    assert pool.restarts == restarts + 1


def test_bucket_refs_outlive_the_learners_that_exported_them(ray_local, pool, prompts, tiny_model_path, tokenizer):
    """The buckets are a streaming generator's returns, owned by the driver: after the exporting
    learner group is gone, the refs still load (as a revived actor's re-sync would need), and a
    bfloat16 sync gives the engines the learners' weights rounded to bf16."""
    import ray

    cfg = LearnerConfig(num_workers=1, cpus_per_worker=0.25, sync_dtype="bfloat16", sync_bucket_mb=1)
    g = LearnerGroup(tiny_model_path, cfg, GRPOConfig(), seed=0)
    try:
        weights = g.get_full_state_dict()
        handle = g.weight_buckets()
    finally:
        g.shutdown()
    assert handle.manifest["dtype"] == "bfloat16" and len(handle.buckets) > 1
    assert ray.get(handle.buckets[0])["index"][0][1] == "bfloat16"
    pool.load_weights(pool.version + 1, handle)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in weights.items()}
    _greedy_like(pool, prompts, rounded, tiny_model_path, tokenizer.eos_token_id)


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
