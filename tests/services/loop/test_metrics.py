"""The driver's Prometheus exporter publishes exactly the step's metrics row."""

import urllib.request

from prometheus_client import generate_latest
from services.backends.network import free_port

from services.loop.metrics import CATALOGUE, RunMetrics, exported_names


ROW = {
    "step": 7, "policy_version": 8, "entropy": 0.41, "entropy_sampled": 0.44, "entropy_target": 0.35,
    "reg_temperature": 0.8, "reg_m": 32, "reg_selected": 17, "reg_direction": "down",
    "reward_mean_grpo": 0.5, "accuracy_grpo": 0.5, "reward_mean_regularizer": 0.25, "accuracy_regularizer": 0.25,
    "step_seconds": 1.5, "time": {"rollout": 0.4, "learner": 0.6}, "reward_failures": {"timeout": 2, "error": 0},
    "eval_pass@8": 0.9, "token_entropy": {"irrelevant": 0.3, "content": 0.11, "forking": 1.2, "nonforking": None},
    "entropy_irrelevant_share": 0.73, "entropy_forking_share": 0.55, "entropy_by_position": [0.9, None, 0.2],
    "reg_weight": 2.5, "reward_reverified": 5, "reward_masked": 2, "entropy_source": "content", "entropy_controlled": 0.11,
}


def test_a_step_row_becomes_labelled_series():
    m = RunMetrics("r1")
    m.record_step(ROW)
    text = generate_latest(m.registry).decode()
    for line in [
        'aepo_policy_entropy{run_id="r1",source="exact"} 0.41',
        'aepo_policy_entropy{run_id="r1",source="sampled"} 0.44',
        'aepo_entropy_target{run_id="r1"} 0.35',
        'aepo_entropy_controlled{run_id="r1",source="content"} 0.11',
        'aepo_regularizer_temperature{run_id="r1"} 0.8',
        'aepo_regularizer_selected{run_id="r1"} 17.0',
        'aepo_controller_decisions_total{direction="down",run_id="r1"} 1.0',
        'aepo_accuracy{batch_kind="regularizer",run_id="r1"} 0.25',
        'aepo_phase_seconds{phase="learner",run_id="r1"} 0.6',
        'aepo_reward_failures_total{outcome="timeout",run_id="r1"} 2.0',
        'aepo_reward_reverified_total{run_id="r1"} 5.0',
        'aepo_reward_masked_total{run_id="r1"} 2.0',
        'aepo_eval_pass_at_k{k="8",run_id="r1"} 0.9',
        'aepo_token_entropy{kind="irrelevant",run_id="r1"} 0.3',
        'aepo_token_entropy{kind="content",run_id="r1"} 0.11',
        'aepo_token_entropy_share{kind="irrelevant",run_id="r1"} 0.73',
        'aepo_token_entropy_share{kind="forking",run_id="r1"} 0.55',
        'aepo_token_entropy_by_position{position="0",run_id="r1"} 0.9',
        'aepo_token_entropy_by_position{position="2",run_id="r1"} 0.2',
        'aepo_regularizer_weight{run_id="r1"} 2.5',
        'aepo_step{run_id="r1"} 7.0',
    ]:
        assert line in text, line
    assert 'kind="nonforking"' not in text and 'position="1"' not in text  # no value: no sample
    assert 'outcome="error"' not in text  # a zero count adds nothing


def test_reward_counters_add_up_over_steps():
    m = RunMetrics("r3")
    m.record_step(ROW)
    m.record_step({**ROW, "reward_failures": {"timeout": 0, "error": 1}, "reward_reverified": 1, "reward_masked": 0})
    text = generate_latest(m.registry).decode()
    for line in ['aepo_reward_failures_total{outcome="timeout",run_id="r3"} 2.0',
                 'aepo_reward_failures_total{outcome="error",run_id="r3"} 1.0',
                 'aepo_reward_reverified_total{run_id="r3"} 6.0', 'aepo_reward_masked_total{run_id="r3"} 2.0']:
        assert line in text, line


def test_every_catalogue_name_is_in_the_exported_set_and_follows_conventions():
    names = exported_names()
    for spec in CATALOGUE:
        assert spec.name in names and spec.name.startswith("aepo_")
        assert spec.name.endswith("_total") == (spec.kind == "counter")
        assert spec.labels[0] == "run_id"


def test_the_exporter_serves_on_loopback():
    port = free_port()
    m = RunMetrics("r2", port=port)
    try:
        m.record_step(ROW)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'aepo_policy_version{run_id="r2"} 8.0' in body
    finally:
        m.close()
