"""The context check: the longest prompt + rollout.max_tokens must fit rollout.max_model_len and the
model's positions, checked at start from config.json and the tokenizer (no weights), refused with
the numbers. The GPU recipe's old 8,192-token responses on Qwen2.5-Math-7B (4,096 positions) are
the case that motivated it."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from services.cli.config_file import load_config
from services.data.datasets import PromptItem
from services.model.context import ContextTooLong, check_context, length_problems, longest_prompt, model_positions

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "deploy/configs/gpu_qwen25_math_7b_dapo.yaml"
# the recipe as it was: 8,192-token responses, no prompt bound, no max_model_len
OLD_LENGTHS = ["rollout.max_tokens=8192", "rollout.max_prompt_tokens=null", "rollout.max_model_len=null"]


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory) -> Path:
    """A checkpoint directory with Qwen2.5-Math-7B's 4,096 positions and a tokenizer, and no weights."""
    from services.model.tiny import build_char_tokenizer

    d = tmp_path_factory.mktemp("qwen-like")
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 4096,
                                               "rope_scaling": None}))
    build_char_tokenizer().save_pretrained(d)
    return d


def items(*prompts: str) -> tuple[list[PromptItem], list[PromptItem]]:
    train = [PromptItem(f"train-{i}", p, "1", "math") for i, p in enumerate(prompts)]
    return train, [PromptItem("eval-0", "1+1", "2", "math")]


def test_positions_come_from_config_json_with_rope_scaling_counted_as_vllm_does(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert model_positions(tmp_path) == (4096, f"max_position_embeddings in {tmp_path / 'config.json'}")
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}))
    assert model_positions(tmp_path)[0] == 131072
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 2048}}))
    assert model_positions(tmp_path)[0] == 2048
    assert model_positions(tmp_path / "missing")[0] is None


def test_the_old_recipe_lengths_are_refused_with_the_numbers(qwen_like):
    cfg = load_config(RECIPE, OLD_LENGTHS)
    with pytest.raises(ContextTooLong) as err:
        check_context(cfg, qwen_like, items("2+2=?", "what is 12*12?"))
    msg = str(err.value)
    # the longest prompt, as the char tokenizer encodes it: <bos> + 14 characters
    assert "the longest prompt ('train-1') 15 + rollout.max_tokens 8192 = 8207 tokens > the model's 4096 positions" in msg
    assert f"(max_position_embeddings in {qwen_like / 'config.json'})" in msg
    assert "lower rollout.max_tokens to 4081 or less" in msg


def test_the_fixed_recipe_fits_qwen25_math_7b(qwen_like):
    from services.model.plan_memory import PRESETS

    cfg = load_config(RECIPE)
    rc = cfg.rollout
    assert rc.max_prompt_tokens + rc.max_tokens <= rc.max_model_len <= PRESETS["qwen2.5-math-7b"].max_positions == 4096
    fit = check_context(cfg, qwen_like, items("2+2=?", "what is 12*12?"))
    assert fit == {"longest_prompt": 15, "longest_prompt_id": "train-1", "prompt_bound": 1024, "max_tokens": 3072,
                   "max_model_len": 4096, "positions": 4096}


def test_the_recipe_reads_the_published_layouts_through_the_presets():
    data = load_config(RECIPE).data
    assert (data.preset, data.eval_preset) == ("dapo_math", "math500")
    assert (data.prompt_key, data.answer_key, data.eval_prompt_key, data.eval_answer_key) == (None,) * 4


def test_a_max_model_len_over_the_positions_is_refused(qwen_like):
    cfg = load_config(RECIPE, ["rollout.max_model_len=8704", "rollout.max_tokens=3072"])
    with pytest.raises(ContextTooLong, match=r"rollout.max_model_len 8704 is over the model's 4096 positions .*"
                                             r"lower it to 4096 or less"):
        check_context(cfg, qwen_like, items("1+1"))


def test_a_prompt_longer_than_the_bound_is_named(qwen_like):
    cfg = load_config(RECIPE, ["rollout.max_prompt_tokens=8", "rollout.max_tokens=16"])
    with pytest.raises(ContextTooLong, match=r"prompt 'train-1' is 15 tokens > rollout.max_prompt_tokens 8"):
        check_context(cfg, qwen_like, items("2+2=?", "what is 12*12?"))


def test_the_bound_against_max_model_len_is_refused_when_the_config_is_read():
    with pytest.raises(ValueError, match="rollout.max_prompt_tokens 1024 \\+ max_tokens 8192 = 9216 tokens > "
                                              "max_model_len 4096"):
        load_config(RECIPE, ["rollout.max_tokens=8192"])


def test_every_limit_exceeded_is_named_once():
    problems = length_problems(1000, "prompt", 4000, 4096, 4096, "config.json")
    assert problems == [
        "prompt 1000 + rollout.max_tokens 4000 = 5000 tokens > rollout.max_model_len 4096: lower rollout.max_tokens "
        "to 3096 or less, or shorten the prompts",
        "prompt 1000 + rollout.max_tokens 4000 = 5000 tokens > the model's 4096 positions (config.json): lower "
        "rollout.max_tokens to 3096 or less, or shorten the prompts"]
    assert length_problems(1000, "prompt", 3096, None, 4096, "config.json") == []


def test_the_longest_prompt_is_measured_as_the_run_encodes_it_chat_template_included():
    from services.model.tiny import build_char_tokenizer, encode_prompt

    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ '<bos>' + m['content'] + '|' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '>' }}{% endif %}")
    rng = random.Random(0)
    prompts = ["".join(rng.choice("0123456789+-*/") for _ in range(rng.randint(1, 60))) for _ in range(300)]
    train, _ = items(*prompts)
    for template, system in ((False, None), (True, None), (True, "12345")):
        exact = max(len(encode_prompt(tok, p, template, system)) for p in prompts)
        n, which = longest_prompt(tok, train, template, system)
        assert n == exact and len(encode_prompt(tok, prompts[int(which.split("-")[1])], template, system)) == exact
    assert longest_prompt(tok, []) == (0, None)


def test_aepo_train_refuses_the_old_recipe_lengths_before_anything_starts(qwen_like, tmp_path, capsys):
    from services.cli.train import add_arguments, main

    data = tmp_path / "math500.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i}+{i}=?", "answer": str(2 * i)}) + "\n" for i in range(12)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {qwen_like}}}\n"
                   f"data: {{type: file, train_path: {data}, preset: math500}}\n"
                   "rollout: {max_tokens: 8192}\nwarm_start: {steps: 0}\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--config", str(cfg), "--backend", "local", "--no-progress", "--output-dir", str(tmp_path / "r")])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("aepo train: the run does not fit the model's context: the longest prompt ('train-10') 8 + "
                          "rollout.max_tokens 8192 = 8200 tokens > the model's 4096 positions")
    assert "Traceback" not in err and not (tmp_path / "r" / "metrics.jsonl").exists()
