"""The exported policy: a checkpoint directory plain transformers and vLLM load, equal to the learner's model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from services.backends.network import free_port
from services.config import AEPOConfig, LearnerConfig
from services.learner.batch import TrainBatch
from services.learner.worker import LearnerWorker
from services.model.export import export_policy

PROMPTS = [[1, 13, 12, 7, 12, 21], [1, 5, 6, 19, 4, 21], [1, 9, 9, 20, 21]]


def _batch() -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    prompts = [PROMPTS[i % 3] for i in range(6)]
    responses = [torch.randint(4, 23, (5,), generator=g).tolist() + [2] for _ in range(6)]
    return TrainBatch.from_sequences(prompts, responses, torch.randn(6, generator=g), [False] * 6, pad_id=0)


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """A learner rank after two updates (lr high enough to move every weight), its weights, the
    log-probs its own FSDP model gives a batch, and the export of those weights."""
    cfg = LearnerConfig(num_workers=1, cpus_per_worker=2, micro_batch_size=4, lr=1e-2)
    worker = LearnerWorker(0, 1, tiny_model_path, cfg, AEPOConfig(), seed=0)
    worker.setup("127.0.0.1", free_port())
    try:
        for _ in range(2):
            worker.update(_batch())
        weights = {k: v.clone() for k, v in worker.full_state_dict().items()}
        learner_logp = worker.compute_logprobs(_batch())
    finally:
        worker.shutdown()
    out = export_policy(tiny_model_path, weights, tmp_path_factory.mktemp("export") / "policy", info={"step": 2})
    return weights, learner_logp, out


def test_plain_transformers_loads_the_export_and_computes_what_the_learner_computes(trained, tiny_model_path):
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    weights, learner_logp, out = trained
    assert sorted(os.listdir(out)) == ["aepo_export.json", "config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded = model.state_dict()
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied again
    init = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    assert not torch.equal(init.model.embed_tokens.weight, loaded["model.embed_tokens.weight"])  # trained, not the start
    batch = _batch()
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask[:, 1:].bool()
    assert torch.allclose(logp[mask], learner_logp[:, 1:][mask], atol=1e-5)
    from services.model.tiny import load_tokenizer

    tok, source = PreTrainedTokenizerFast.from_pretrained(out), load_tokenizer(tiny_model_path)
    text = "9,8,3>69|9*8=72, 72-3=69"
    assert tok(text)["input_ids"] == source(text)["input_ids"] and tok.decode(source(text)["input_ids"][1:]) == text
    assert GenerationConfig.from_pretrained(out).eos_token_id == GenerationConfig.from_pretrained(tiny_model_path).eos_token_id
    assert json.loads((out / "aepo_export.json").read_text()) == {"source_model": tiny_model_path, "step": 2}


def test_large_models_are_written_in_shards_that_load_the_same(trained, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    weights, _, _ = trained
    out = export_policy(tiny_model_path, weights, tmp_path / "sharded", max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_an_incomplete_state_dict_is_refused_and_nothing_is_written(trained, tiny_model_path, tmp_path):
    weights, _, _ = trained
    partial = {k: v for k, v in weights.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match=r"lacks \d+ weights .*layers\.1\."):
        export_policy(tiny_model_path, partial, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.vllm
def test_vllm_loads_the_export_and_decodes_greedily_like_the_learner_weights(trained, tokenizer):
    if os.environ.get("CI"):
        import vllm  # noqa: F401  (CI must exercise the engine, never skip it)
    else:
        pytest.importorskip("vllm")
    from reference_decoding import reference_greedy

    from services.config import RolloutConfig
    from services.rollout.service import RolloutService
    from transformers import AutoModelForCausalLM

    _, _, out = trained
    svc = RolloutService(str(out), RolloutConfig(engine="vllm-cpu", max_tokens=10), seed=0)
    try:
        got = [s.response_ids for s in svc.generate([(i, p) for i, p in enumerate(PROMPTS)], 1, 0.0)]
    finally:
        svc.close()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert got == [reference_greedy(plain, p, 10, tokenizer.eos_token_id) for p in PROMPTS]
