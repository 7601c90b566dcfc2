"""The project-made small LLM: a hub-style checkpoint loaded the way Qwen/Qwen2.5-Math-7B is."""

from __future__ import annotations

import json
import os

import pytest
import torch

from services.config import SmallLLMConfig
from services.data.wordproblems import make_splits
from services.model.small_llm import DEFAULT_SYSTEM, IM_END, PAD, build_small_llm

CFG = SmallLLMConfig(corpus_problems=600, vocab_size=512)


@pytest.fixture(scope="module")
def small_llm(tmp_path_factory) -> str:
    return str(build_small_llm(CFG, tmp_path_factory.mktemp("sllm") / "model", seed=0))


def test_the_directory_is_what_a_hub_checkpoint_ships(small_llm):
    names = set(os.listdir(small_llm))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    tok_cfg = json.loads(open(os.path.join(small_llm, "tokenizer_config.json")).read())
    assert tok_cfg["tokenizer_class"] == "Qwen2Tokenizer" and "<|im_start|>" in tok_cfg["chat_template"]
    config = json.loads(open(os.path.join(small_llm, "config.json")).read())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_key_value_heads"] == 2
    assert json.loads(open(os.path.join(small_llm, "tokenizer.json")).read())["model"]["type"] == "BPE"


def test_auto_classes_load_it_and_the_bpe_round_trips_text(small_llm):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(small_llm)  # as for a hub model: the class its config names
    assert type(tok).__name__ == "Qwen2Tokenizer"
    raw = Tokenizer.from_file(os.path.join(small_llm, "tokenizer.json"))
    _, held_out = make_splits(1, 20, seed=7)  # text the tokenizer was not trained on
    tokens = nbytes = 0
    for p in held_out:
        for text in (p.question, p.solution):
            ids = tok(text)["input_ids"]
            assert ids == raw.encode(text).ids and tok.decode(ids) == text
            tokens, nbytes = tokens + len(ids), nbytes + len(text.encode())
    assert tokens < 0.5 * nbytes  # merges learned: well under a token per byte (digits stay one a token)
    digits = tok.convert_ids_to_tokens(tok("1234")["input_ids"])
    assert digits == ["1", "2", "3", "4"]  # Qwen2's pre-tokenizer: one digit a token
    model = AutoModelForCausalLM.from_pretrained(small_llm)
    assert model.config.vocab_size == len(tok) and model.lm_head.weight.shape[0] == len(tok)
    gen = GenerationConfig.from_pretrained(small_llm)
    assert gen.eos_token_id == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD)]
    assert tok.eos_token == IM_END and tok.pad_token == PAD


def test_the_chat_template_has_a_system_turn(small_llm):
    from services.model.tiny import encode_prompt, load_tokenizer

    tok = load_tokenizer(small_llm)  # the path every engine and learner takes
    text = tok.decode(encode_prompt(tok, "What is 2+2?", chat_template=True))
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    own = tok.decode(encode_prompt(tok, "Q", chat_template=True, system_prompt="Be brief."))
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>")


def test_the_build_is_deterministic_and_reused(small_llm, tmp_path):
    again = build_small_llm(CFG, tmp_path / "again", seed=0)
    from safetensors.torch import load_file

    w1, w2 = load_file(os.path.join(small_llm, "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert open(os.path.join(small_llm, "tokenizer.json")).read() == (again / "tokenizer.json").read_text()
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_small_llm(CFG, again, seed=0) == again and (again / "model.safetensors").stat().st_mtime_ns == mtime
