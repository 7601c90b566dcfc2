"""The `hf` engine and the RolloutService around it, in process (no Ray)."""

from __future__ import annotations

import pytest
import torch
from reference_decoding import first_token_entropy, hf_model_with, plugin_entropy, reference_greedy

from services.config import RolloutConfig
from services.rollout.engines.hf import sample_next_tokens
from services.model.tiny import encode_prompt
from services.rollout.service import RolloutService, SamplingRequest

PROMPTS = ["9,8,3>69|", "1,2,3>6|", "4,5,6>120|", "7,7>1|"]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def service(tiny_model_path):
    return RolloutService(tiny_model_path, RolloutConfig(engine="hf", max_tokens=12), seed=0)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [(f"p{i}", encode_prompt(tokenizer, t)) for i, t in enumerate(PROMPTS)]


def test_nucleus_keeps_the_smallest_prefix_reaching_top_p():
    # probs 0.5, 0.3, 0.2: with top_p 0.6 the nucleus is {0, 1} (0.5 < 0.6, 0.5+0.3 >= 0.6);
    # with top_p 0.5 it is {0} alone; so token 2 is never drawn and token 1 only in the first row
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(2000, 1)
    top_p = torch.tensor([0.6] * 1000 + [0.5] * 1000)
    drawn = sample_next_tokens(logits, torch.ones(2000), top_p, torch.Generator().manual_seed(0))
    assert set(drawn[:1000].tolist()) == {0, 1} and set(drawn[1000:].tolist()) == {0}
    # renormalised nucleus: P(0) = 0.5 / 0.8 = 0.625; 1000 draws give it within 4 sd (0.061)
    assert abs((drawn[:1000] == 0).float().mean().item() - 0.625) < 0.061


def test_temperature_zero_is_argmax_whatever_the_other_rows_do():
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    drawn = sample_next_tokens(logits, torch.tensor([0.0, 5.0]), torch.ones(2), torch.Generator().manual_seed(0))
    assert drawn[0].item() == 1


def test_samples_carry_their_prompt_temperature_version_and_engine(service, prompts, tokenizer):
    samples = service.generate(prompts, n=3, temperature=1.0, seed=1)
    assert [s.prompt for s in samples] == [pid for pid, _ in prompts for _ in range(3)]
    for s in samples:
        assert (s.temperature, s.policy_version, s.engine) == (1.0, 0, "hf")
        assert s.prompt_ids == dict(prompts)[s.prompt]
        if s.finish_reason == "stop":  # eos is kept, once, at the end
            assert s.response_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in s.response_ids[:-1]
        else:
            assert s.finish_reason == "length" and len(s.response_ids) == 12
            assert tokenizer.eos_token_id not in s.response_ids


def test_each_request_keeps_its_own_max_tokens(service, prompts):
    result = service.generate_many(
        [SamplingRequest(prompts, 4, 1.0, max_tokens=3), SamplingRequest(prompts, 4, 1.0, max_tokens=9)], seed=2
    )
    assert max(len(s.response_ids) for s in result.samples[0]) <= 3
    assert max(len(s.response_ids) for s in result.samples[1]) <= 9
    assert result.stats["gen_tokens"] == sum(len(s.response_ids) for g in result.samples for s in g)


def test_a_seeded_call_repeats_and_an_unseeded_one_moves_on(service, prompts):
    a = [s.response_ids for s in service.generate(prompts, 4, 1.0, seed=7)]
    b = [s.response_ids for s in service.generate(prompts, 4, 1.0, seed=7)]
    c = [s.response_ids for s in service.generate(prompts, 4, 1.0)]
    assert a == b and a != c


def test_batched_greedy_equals_unpadded_reference_greedy(service, prompts, tiny_model_path, tokenizer):
    model = hf_model_with(tiny_model_path)
    got = service.generate(prompts, n=1, temperature=0.0, max_tokens=12)
    want = [reference_greedy(model, ids, 12, tokenizer.eos_token_id) for _, ids in prompts]
    assert [s.response_ids for s in got] == want


def test_load_weights_changes_what_is_sampled_and_bumps_the_version(tiny_model_path, prompts, perturbed_weights, tokenizer):
    svc = RolloutService(tiny_model_path, RolloutConfig(engine="hf", max_tokens=8), seed=0)
    before = [s.response_ids for s in svc.generate(prompts, n=1, temperature=0.0)]
    stats = svc.load_weights(3, perturbed_weights)
    assert stats["policy_version"] == 3 and stats["sync_s"] >= 0
    got = svc.generate(prompts, n=1, temperature=0.0)
    perturbed = hf_model_with(tiny_model_path, perturbed_weights)
    assert [s.response_ids for s in got] == [reference_greedy(perturbed, ids, 8, tokenizer.eos_token_id) for _, ids in prompts]
    assert [s.response_ids for s in got] != before
    assert all(s.policy_version == 3 for s in got)


def test_temperature_is_honoured_per_request_within_one_call(tiny_model_path, tokenizer, peaked_weights):
    """Empirical first-token entropy at T = 0.8 < 1.0 < 1.2, all three drawn in one batch.

    Expected values: the exact entropies of softmax(logits / T) from a plain forward pass (about
    0.79, 1.40, 1.90 nats, see conftest). With 1500 draws the plug-in estimate's standard error is
    under 0.04 and its bias under (23-1)/(2*1500) = 0.007, so 0.15 is a > 3.5-sd tolerance, and
    neighbouring temperatures are > 12 sd apart.
    """
    svc = RolloutService(tiny_model_path, RolloutConfig(engine="hf"), seed=0)
    svc.load_weights(1, peaked_weights)
    prompt = encode_prompt(tokenizer, "9,8,3>69|")
    temps = (0.8, 1.0, 1.2)
    result = svc.generate_many([SamplingRequest([("p", prompt)], 1500, t, max_tokens=1) for t in temps], seed=0)
    empirical = [plugin_entropy([s.response_ids[0] for s in group]) for group in result.samples]
    peaked = hf_model_with(tiny_model_path, peaked_weights)
    exact = [first_token_entropy(peaked, prompt, t) for t in temps]
    assert empirical[0] < empirical[1] < empirical[2]
    for e, x in zip(empirical, exact):
        assert abs(e - x) < 0.15, (empirical, exact)


@pytest.mark.skipif(not __import__("services.rollout.engines.hf", fromlist=["x"])._prealloc_supported(), reason="transformers 4.x")
def test_preallocated_cache_and_eager_attention_sample_what_the_default_cache_samples(tiny_model_path, prompts):
    """The fast path (KV written in place, eager attention) against transformers' own DynamicCache
    with SDPA: same seed, same rows, with finished rows leaving the batch along the way, so the
    same tokens come out. 64 rows of T = 1.3 sampling on the untrained model run to varied lengths."""
    from services.rollout.engines import EngineRequest
    from services.rollout.engines.hf import HFEngine

    reqs = [EngineRequest(ids, n=16, temperature=1.3, max_tokens=12, seed=3) for _, ids in prompts]
    fast = HFEngine(tiny_model_path, seed=0)
    slow = HFEngine(tiny_model_path, seed=0, attn_implementation="sdpa", preallocate_kv=False)
    assert fast.preallocate_kv and not slow.preallocate_kv
    got = [[o.response_ids for o in outs] for outs in fast.generate(reqs)]
    want = [[o.response_ids for o in outs] for outs in slow.generate(reqs)]
    assert got == want
    lengths = {len(r) for outs in got for r in outs}
    assert len(lengths) > 3  # rows did finish at different steps


def test_preallocated_layer_writes_in_place_and_refuses_to_overflow():
    from services.rollout.engines.hf import _prealloc_supported, preallocated_cache

    if not _prealloc_supported():
        pytest.skip("transformers 4.x")
    cache = preallocated_cache(num_layers=1, capacity=5)
    layer = cache.layers[0]
    k, v = torch.arange(2 * 3 * 2.0).view(1, 2, 3, 2), torch.ones(1, 2, 3, 2)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, k) and layer.get_seq_length() == 3
    keys, _ = layer.update(k[:, :, :1] + 100, v[:, :, :1])
    assert keys.shape[2] == 4 and torch.equal(keys[:, :, :3], k) and torch.equal(keys[:, :, 3], k[:, :, 0] + 100)
    with pytest.raises(RuntimeError, match="KV cache full"):
        layer.update(k, v)
    cache2 = preallocated_cache(num_layers=1, capacity=4)
    cache2.layers[0].update(torch.stack([k[0], k[0] + 1]), torch.stack([v[0], v[0]]))
    cache2.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache2.layers[0].keys, (k + 1)) and cache2.get_seq_length() == 3


def test_a_rollout_service_changes_its_generation_threads(tiny_model_path):
    import torch

    from services.config import RolloutConfig
    from services.rollout.service import RolloutService

    before = torch.get_num_threads()
    try:
        svc = RolloutService(tiny_model_path, RolloutConfig(engine="hf"), seed=0)
        assert svc.set_threads(1) == 1 and svc.set_threads(0) == 1
    finally:
        torch.set_num_threads(before)


def test_a_prompt_repeated_across_requests_is_prefilled_once_and_decodes_like_the_reference(
    tiny_model_path, prompts, tokenizer
):
    """Rows of one prompt share its prefill (n samples, and the same prompt in another request):
    greedy rows still equal the unpadded no-cache reference, and sampled rows differ from each other."""
    from services.rollout.engines import EngineRequest
    from services.rollout.engines.hf import HFEngine

    (_, a), (_, b) = prompts[0], prompts[2]
    engine = HFEngine(tiny_model_path, seed=0)
    reqs = [EngineRequest(a, n=3, temperature=0.0, max_tokens=10), EngineRequest(b, n=2, temperature=0.0, max_tokens=10),
            EngineRequest(a, n=2, temperature=0.0, max_tokens=10), EngineRequest(a, n=6, temperature=1.5, max_tokens=10)]
    outs = engine.generate(reqs)
    model = hf_model_with(tiny_model_path)
    want_a = reference_greedy(model, a, 10, tokenizer.eos_token_id)
    want_b = reference_greedy(model, b, 10, tokenizer.eos_token_id)
    assert [o.response_ids for o in outs[0] + outs[2]] == [want_a] * 5
    assert [o.response_ids for o in outs[1]] == [want_b] * 2
    assert len({tuple(o.response_ids) for o in outs[3]}) > 1


def test_the_shared_prefill_samples_what_one_prefill_per_row_samples(tiny_model_path, prompts):
    from services.rollout.engines import EngineRequest
    from services.rollout.engines.hf import HFEngine

    reqs = [EngineRequest(ids, n=8, temperature=t, max_tokens=12, seed=11) for t in (1.0, 1.3) for _, ids in prompts]
    shared = HFEngine(tiny_model_path, seed=0)
    per_row = HFEngine(tiny_model_path, seed=0, share_prefill=False)
    got = [[o.response_ids for o in outs] for outs in shared.generate(reqs)]
    assert got == [[o.response_ids for o in outs] for outs in per_row.generate(reqs)]
