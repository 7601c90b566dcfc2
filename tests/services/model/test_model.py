"""The embedded tiny model and its character-level tokenizer."""

from __future__ import annotations

import os
import random

import pytest

from services.config import ModelConfig, TinyModelConfig
from services.model.tiny import (
    CHARSET,
    build_tiny_model,
    decode_response,
    encode_prompt,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    tiny_config_hash,
)


def toy_strings() -> list[str]:
    """The issue's examples, strings with spaces everywhere, and 200 Countdown prompts + answers."""
    from services.data.countdown import sample_problem, warm_start_answer

    rng = random.Random(0)
    out = ["9,8,3>69|", "9*8=72,72-3=69", " 9 * 8 = 72 , 72 - 3 = 69 ", "  ", "", "".join(CHARSET)]
    for _ in range(200):
        p = sample_problem(rng)
        out += [p.prompt, warm_start_answer(p, rng, space_prob=0.5)]
    return out


def test_every_toy_string_round_trips_exactly_spaces_included(tokenizer):
    for text in toy_strings():
        ids = encode_prompt(tokenizer, text)
        assert decode_response(tokenizer, ids) == text
        # one token per character after <bos>
        assert len(ids) == len(text) + 1


def test_the_issue_example_encodes_to_bos_then_one_id_per_character(tokenizer):
    # vocab order: <pad> 0, <bos> 1, <eos> 2, <unk> 3, then "0".."9" = 4..13, "+-*/=,>|" = 14..21, " " = 22
    assert encode_prompt(tokenizer, "9,8,3>69|") == [1, 13, 19, 12, 19, 7, 20, 10, 13, 21]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 23
    response = tokenizer("9*8=72,72-3=69", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert decode_response(tokenizer, response) == "9*8=72,72-3=69"


def test_characters_outside_the_toy_alphabet_become_unk(tokenizer):
    assert encode_prompt(tokenizer, "a1") == [1, tokenizer.unk_token_id, 5]


def test_tiny_model_is_a_tied_qwen2_of_about_a_million_parameters(tiny_model_path):
    model = load_causal_lm(tiny_model_path)
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (128, 4, 4, 512)
    assert cfg.hidden_size // cfg.num_attention_heads == 32  # vLLM needs head_dim >= 32
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    # embedding 23*128 = 2944; per layer q,k,v 3*(128*128+128) + o 128*128 + MLP 3*128*512
    # + 2 norms 2*128 = 262784, times 4 = 1051136; final norm 128 -> 1054208 (lm_head is tied)
    assert sum(p.numel() for p in model.parameters()) == 1_054_208


def test_building_again_with_the_same_config_reuses_the_files(tmp_path):
    cfg = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64)
    first = build_tiny_model(cfg, tmp_path / "m", seed=3)
    stamp = os.stat(first / "model.safetensors").st_mtime_ns
    again = build_tiny_model(cfg, tmp_path / "m", seed=3)
    assert again == first and os.stat(again / "model.safetensors").st_mtime_ns == stamp


def test_another_config_or_seed_rebuilds_in_place(tmp_path):
    small = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64)
    build_tiny_model(small, tmp_path / "m", seed=0)
    build_tiny_model(small, tmp_path / "m", seed=1)
    assert load_causal_lm(tmp_path / "m").config.num_hidden_layers == 1
    assert tiny_config_hash(small, 0) != tiny_config_hash(small, 1)
    bigger = small.model_copy(update={"num_layers": 2})
    build_tiny_model(bigger, tmp_path / "m", seed=1)
    assert load_causal_lm(tmp_path / "m").config.num_hidden_layers == 2


def test_the_default_path_builds_under_the_cache_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    small = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64)
    path = resolve_model_path(ModelConfig(tiny=small), cache_dir=tmp_path)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert path == str(tmp_path / f"tiny-{tiny_config_hash(small, 0)}")
    assert load_tokenizer(path).decode(encode_prompt(load_tokenizer(path), "1 + 2"), skip_special_tokens=True) == "1 + 2"
    assert resolve_model_path(ModelConfig(path=str(tmp_path))) == str(tmp_path)  # a local directory, unchanged


def test_a_width_not_divisible_by_the_head_count_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        TinyModelConfig(hidden_size=100, num_heads=3)
