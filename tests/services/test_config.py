"""Run configs: every YAML under deploy/ parses, and bad configs are refused with a reason."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.cli.config_file import load_config
from services.config import (
    AEPOConfig,
    AEPOFixedTemperatureConfig,
    TrainConfig,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RUN_CONFIGS = sorted((DEPLOY / "configs").glob("*.yaml"))
ALL_YAML = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def test_deploy_has_the_default_a_gpu_recipe_and_every_baseline():
    names = {p.stem for p in RUN_CONFIGS}
    assert {"cpu_default", "gpu_qwen25_math_7b_dapo"} <= names
    types = {load_config(p).algorithm.type for p in RUN_CONFIGS}
    assert types == {"grpo", "aepo", "aepo_t1", "aepo_signed", "entropy_reg", "entropy_adv", "clip_cov", "kl_cov",
                     "adaptive_entropy", "entropic"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_under_deploy_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_under_deploy_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is not None for d in docs)


def test_the_default_config_is_the_recipe_that_holds_a_target_at_toy_scale():
    cfg = load_config(DEPLOY / "configs" / "cpu_default.yaml")
    alg = cfg.algorithm
    assert isinstance(alg, AEPOConfig)
    assert (alg.rule.m_up, alg.rule.m_down, alg.prompt_share, alg.target.value) == (64, 32, 1.0, 0.35)
    assert (cfg.trainer.prompts_per_step, cfg.rollout.group_size) == (32, 8)


def test_the_paper_defaults_are_the_schema_defaults():
    alg = AEPOConfig()
    assert (alg.rule.temperature_up, alg.rule.temperature_down, alg.rule.m_up, alg.rule.m_down) == (1.2, 0.8, 60, 30)
    assert (alg.adv_threshold, alg.prompt_share, alg.mode, alg.coef) == (0.05, 0.25, "replace", 1.0)


def test_the_t1_ablation_forces_both_temperatures_to_one():
    alg = AEPOFixedTemperatureConfig.model_validate({"type": "aepo_t1", "rule": {"temperature_up": 1.5}})
    assert alg.regularizer_temperatures() == (1.0, 1.0)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"algorithm": {"type": "ppo2"}}, "ppo2"),
        ({"algorithm": {"type": "aepo", "prompt_share": 0}}, "greater than 0"),
        ({"algorithm": {"type": "aepo", "rule": {"temperature_up": 2.5}}}, "less than or equal to 2"),
        ({"algorithm": {"type": "clip_cov", "cov_lb": 5, "cov_ub": 1}}, "cov_ub > cov_lb"),
        ({"rollout": {"group_size": 1}}, "greater than or equal to 2"),
        ({"reward": {"mode": "external"}}, "needs reward.url"),
        ({"model": {"tiny": {"hidden_size": 130, "num_heads": 4}}}, "not divisible"),
        ({"trainer": {"stepz": 3}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs_are_refused_with_a_readable_reason(patch, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(patch)


def test_load_config_names_the_file_when_it_is_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml: a run config is a mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("algorithm: {type: aepo\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_dotted_overrides_change_the_config_and_are_validated_like_the_file():
    path = DEPLOY / "configs" / "cpu_default.yaml"
    cfg = load_config(path, ["trainer.steps=20", "algorithm.target.value=0.3", "rollout.engine=vllm-cpu",
                             "model.tiny.num_layers=2", "learner.entropy_analysis.irrelevant_tokens=[' ', ',']",
                             "trainer.steps=7"])
    assert cfg.trainer.steps == 7  # applied in order: the last one wins
    assert cfg.algorithm.target.value == 0.3 and cfg.rollout.engine == "vllm-cpu" and cfg.model.tiny.num_layers == 2
    assert cfg.learner.entropy_analysis.irrelevant_tokens == [" ", ","]
    assert load_config(path).trainer.steps == 150  # the file itself is untouched
    with pytest.raises(ValueError, match=r"(?s)with overrides trainer.stepz=3.*trainer.stepz\n  Extra inputs"):
        load_config(path, ["trainer.stepz=3"])  # unknown key: the model says which
    with pytest.raises(ValueError, match="engine"):
        load_config(path, ["rollout.engine=tgi"])
    with pytest.raises(ValueError, match=r"(?s)trainer.steps.*greater than or equal"):
        load_config(path, ["trainer.steps=-1"])
    with pytest.raises(ValueError, match="expected key.path=value"):
        load_config(path, ["trainer.steps"])
    with pytest.raises(ValueError, match="trainer.steps is 150, not a mapping"):
        load_config(path, ["trainer.steps.x=1"])


def test_word_problems_need_the_small_llm_in_its_chat_template():
    ok = TrainConfig.model_validate({"data": {"type": "wordproblems"}, "model": {"builtin": "small_llm", "chat_template": True}})
    assert ok.data.type == "wordproblems"
    with pytest.raises(ValidationError, match="model.builtin: small_llm"):
        TrainConfig.model_validate({"data": {"type": "wordproblems"}})
    with pytest.raises(ValidationError, match="model.chat_template: true"):
        TrainConfig.model_validate({"data": {"type": "wordproblems"}, "model": {"builtin": "small_llm"}})
    # a checkpoint of one's own is the user's call
    TrainConfig.model_validate({"data": {"type": "wordproblems"}, "model": {"path": "/models/x"}})
