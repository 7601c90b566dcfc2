"""Colocated placement (services/backends/placement.py): a learner rank and a rollout engine share
one bundle's GPU, the shared group outlives either role, and the engine sleeps between generations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from services.config import LearnerConfig, RolloutConfig, TrainConfig

# A child process with its own Ray that declares 2 (fake) GPUs: the test session's Ray has none.
SHARED_GPU = textwrap.dedent("""
    import json, os
    from services.backends.network import local_ray_env
    os.environ.update(local_ray_env())
    import ray
    ray.init(address="local", num_cpus=4, num_gpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    from services.backends.placement import colocated_bundles
    from services.config import LearnerConfig, RolloutConfig

    @ray.remote
    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            return {"gpus": [str(g) for g in ray.get_gpu_ids()], "pg": ctx.get_placement_group_id()}

    bundles = colocated_bundles(LearnerConfig(num_workers=2, cpus_per_worker=1), RolloutConfig(num_actors=2, cpus_per_actor=1),
                                gpu=True, timeout_s=60)
    learners = [Probe.options(**bundles.learner_options(i)).remote() for i in range(2)]
    engines = [Probe.options(**bundles.rollout_options(i)).remote() for i in range(2)]
    out = {"learners": ray.get([a.where.remote() for a in learners]), "engines": ray.get([a.where.remote() for a in engines])}
    for a in learners:  # the learners replaced (a recovery): the engines keep their places
        ray.kill(a)
    again = [Probe.options(**bundles.learner_options(i)).remote() for i in range(2)]
    out["again"] = ray.get([a.where.remote() for a in again], timeout=60)
    out["engines_alive"] = ray.get([a.where.remote() for a in engines], timeout=60)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_a_learner_rank_and_its_engine_share_one_gpu_and_survive_each_others_replacement():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SHARED_GPU], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for i in range(2):
        assert out["learners"][i]["gpus"] == out["engines"][i]["gpus"] and len(out["engines"][i]["gpus"]) == 1
        assert out["again"][i]["gpus"] == out["engines"][i]["gpus"]
    assert out["learners"][0]["gpus"] != out["learners"][1]["gpus"]  # one GPU per rank
    assert len({w["pg"] for w in out["learners"] + out["engines"] + out["again"]}) == 1
    assert out["engines_alive"] == out["engines"]


def test_colocated_needs_no_more_engines_than_learner_ranks():
    with pytest.raises(ValueError, match="rollout.num_actors 3 > learner.num_workers 2"):
        TrainConfig.model_validate({"rollout": {"placement": "colocated", "num_actors": 3}, "learner": {"num_workers": 2}})
    assert TrainConfig.model_validate({"rollout": {"placement": "colocated", "num_actors": 2}}).rollout.placement == "colocated"


class RecordingEngine:
    name = "hf"

    def __init__(self):
        self.calls = []

    def generate(self, requests):
        self.calls.append("generate")
        from services.rollout.engines import EngineOutput

        return [[EngineOutput(response_ids=[1], finish_reason="stop")] * r.n for r in requests]

    def load_weights(self, weights):
        self.calls.append("load")

    def sleep(self):
        self.calls.append("sleep")

    def wake_up(self):
        self.calls.append("wake")


@pytest.mark.parametrize("placement,expected", [
    ("colocated", ["wake", "generate", "sleep", "wake", "load", "wake", "generate", "sleep"]),
    ("split", ["wake", "generate", "wake", "load", "wake", "generate"]),
])
def test_a_colocated_engine_sleeps_after_generating_and_wakes_before_weights_or_generation(monkeypatch, placement,
                                                                                            expected):
    import services.rollout.service as S

    engine = RecordingEngine()
    monkeypatch.setattr(S, "make_engine", lambda *a, **k: engine)
    service = S.RolloutService("unused", RolloutConfig(placement=placement, max_tokens=4))
    service.generate([("p", [1, 2])], n=2, temperature=1.0)
    service.load_weights(1, {})
    service.generate([("p", [1, 2])], n=2, temperature=1.0)
    assert engine.calls == expected


def test_the_vllm_engine_asks_for_sleep_mode_only_when_colocated():
    from services.rollout.service import engine_options

    assert engine_options(RolloutConfig(engine="vllm", placement="colocated"))["sleep_mode"] is True
    assert engine_options(RolloutConfig(engine="vllm"))["sleep_mode"] is False
    assert "sleep_mode" not in engine_options(RolloutConfig(engine="hf", placement="colocated"))
    assert LearnerConfig().num_workers == 2
