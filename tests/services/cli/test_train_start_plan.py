"""Every `aepo train` checks its plan against the cluster it is about to run on before any role
starts: refused (exit 2, the refusals on stderr, nothing written), or a line that it fits."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CPU_DEFAULT = ROOT / "deploy/configs/cpu_default.yaml"
GiB = 2**30
# a 1-step toy run, fast on the local backend: no warm start, no eval, no checkpoint
SHORT = ("--steps", "1", "warm_start.steps=0", "trainer.eval_every=0", "trainer.save_every=0",
         "trainer.prompts_per_step=4", "data.num_eval=4")
# ~400 B parameters: no host of today holds its CPU learner
HUGE = ("model.tiny.hidden_size=16384", "model.tiny.intermediate_size=65536", "model.tiny.num_layers=128",
        "model.tiny.num_heads=128")


def _train(out: Path, *extra: str, backend: str = "local") -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "services.cli.train", "--config", str(CPU_DEFAULT), "--no-progress",
           "--backend", backend, "--output-dir", str(out), *SHORT, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_default_is_planned_and_runs(tmp_path):
    run = _train(tmp_path / "run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "plan: cpu-default-aepo fits this machine: 1.5 CPU, 0 GPU of " in run.stdout
    assert "note:" not in run.stdout  # the toy leaves nothing unchecked on a CPU machine
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_model_no_host_holds_is_refused_before_anything_starts(tmp_path):
    run = _train(tmp_path / "run", *HUGE)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stderr.startswith("aepo train: the run does not fit this machine (`aepo plan ")
    assert "  cpu-default-aepo: refused: host memory: the run needs " in run.stderr
    assert "--skip-plan starts it anyway" in run.stderr and "Traceback" not in run.stderr
    # refused before the model is built, the prompts read or an output written
    assert "context:" not in run.stdout and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_ray_backend_is_checked_against_the_ray_it_started(tmp_path):
    run = _train(tmp_path / "run", "learner.num_workers=64", "learner.device=cuda", "--compare", "grpo",
                 backend="ray")
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stderr.startswith("aepo train: the run does not fit the local Ray this run started")
    for name in ("cpu-default-aepo", "cpu-default-aepo-grpo"):  # --compare: both runs are planned
        assert f"  {name}: refused: learner needs 64 GPUs (64 workers × 1), the cluster has " in run.stderr
    assert not (tmp_path / "run").exists()


def _args(out: Path, *extra: str) -> argparse.Namespace:
    from services.cli.train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--config", str(CPU_DEFAULT), "--backend", "local", "--no-progress", "--output-dir",
                         str(out), *extra])


class Reached(Exception):
    """Raised by a stand-in for the step after the plan: the run got past it."""


def test_skip_plan_starts_a_run_the_clusters_description_refuses(tmp_path, monkeypatch, capsys):
    from services.cli import start_plan, train
    from services.cli.plan import Cluster

    def wrong(backend):  # a description that is wrong: a 1 GiB node
        return Cluster("a wrong description", [{"CPU": 2.0, "GPU": 0.0, "memory": GiB}])

    def prepare(cfg, progress):
        raise Reached

    monkeypatch.setattr(start_plan, "run_cluster", wrong)
    monkeypatch.setattr(train, "prepare_run", prepare)
    assert train.main(_args(tmp_path / "r")) == 2
    captured = capsys.readouterr()
    assert "does not fit a wrong description" in captured.err and "refused: host memory" in captured.err
    with pytest.raises(Reached):
        train.main(_args(tmp_path / "r", "--skip-plan"))
    assert "plan: not checked (--skip-plan)" in capsys.readouterr().out


def _fake_hub_model(cache: Path, name: str, config: dict) -> Path:
    """What a download leaves in the hub cache: refs/main naming a commit, config.json under its snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    return snap


def test_a_hub_model_known_only_after_its_download_is_planned_again_before_the_system(tmp_path, monkeypatch,
                                                                                       capsys):
    from services.cli import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    name, cache = "test-org/enormous", tmp_path / "hub"
    enormous = {"model_type": "qwen2", "hidden_size": 16384, "num_hidden_layers": 128, "num_attention_heads": 128,
                "num_key_value_heads": 8, "intermediate_size": 65536, "vocab_size": 150000,
                "max_position_embeddings": 4096}

    def download(cfg, progress):  # the model's files arrive; the run's roles must not start
        snap = _fake_hub_model(cache, name, enormous)
        return str(snap), {}, ([], [])

    monkeypatch.setattr(train, "prepare_run", download)
    monkeypatch.setattr("services.backends.in_process.LocalSystem", None)  # starting it would be a TypeError
    args = _args(tmp_path / "r", f"model.path={name}", f"model.cache_dir={cache}")
    assert train.main(args) == 2
    captured = capsys.readouterr()
    assert "memory not estimated" in captured.out  # the first plan, before the download
    assert captured.err.startswith("aepo train: the run does not fit this machine")
    assert "refused: host memory" in captured.err and "Traceback" not in captured.err


def _describe(cpus: float, strict: bool):
    from services.cli.plan import Cluster

    return Cluster("this machine", [{"CPU": cpus, "GPU": 0.0, "memory": 24 * GiB}], strict_cpus=strict)


@pytest.mark.parametrize("path", sorted((ROOT / "deploy/configs").glob("cpu_*.yaml")), ids=lambda p: p.stem)
def test_every_cpu_config_fits_a_2_core_24_gib_machine_on_both_backends_and_with_compare(path, capsys):
    """On the ray backend the cluster is the local Ray `aepo train` starts: max(cores, what the runs
    reserve) CPUs, all of them Ray's to give (strict)."""
    from services.cli.config_file import load_config
    from services.cli.start_plan import check_start, side_by_side_memory_note, side_by_side_shortfall
    from services.cli.train import compare_config, cpus_needed

    cfg = load_config(path)
    base = compare_config(cfg, "grpo")
    check_start([cfg, base], "local", _describe(2.0, strict=False))
    need = cpus_needed(cfg) + cpus_needed(base)
    plans = check_start([cfg, base], "ray", _describe(float(max(2, need)), strict=True))
    assert side_by_side_shortfall(plans, need, max(2, need)) is None
    assert side_by_side_memory_note(plans) is None
    assert "note:" not in capsys.readouterr().out


def test_the_three_node_test_cluster_fits_its_plan(monkeypatch):
    """tests/multinode.py's run on its three nodes, as the ray backend sees them (custom resources)."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    import multinode

    from services.cli.plan import Cluster
    from services.cli.start_plan import PlanRefused, check_start
    from services.config import TrainConfig

    cfg = TrainConfig.model_validate(multinode.config(Path("/tmp/unused")))
    nodes = [{"CPU": float(cpus), "GPU": 0.0, "memory": 8 * GiB, "custom": {f"{name}_node": 10.0}}
             for name, cpus in multinode.NODES.items()]
    assert check_start([cfg], "ray", Cluster("ray", nodes))[0].fits
    nodes[1]["custom"] = {}  # no node for the learners: the run would wait for one forever
    with pytest.raises(PlanRefused, match="refused: learner asks for learners_node"):
        check_start([cfg], "ray", Cluster("ray", nodes))


def test_the_local_backend_is_planned_as_it_runs():
    from services.cli.config_file import load_config
    from services.cli.start_plan import as_run

    cfg = load_config(CPU_DEFAULT, ["learner.num_workers=8", "learner.device=cuda", "rollout.num_actors=4",
                                    "rollout.gpus_per_actor=2"])
    local = as_run(cfg, "local")
    assert (local.learner.num_workers, local.learner.device) == (1, "cpu")
    assert (local.rollout.num_actors, local.rollout.gpus_per_actor) == (1, None)
    assert as_run(cfg, "ray") is cfg


def test_two_runs_side_by_side_need_the_sum_of_their_gpus_else_they_run_one_after_the_other():
    from services.cli.config_file import load_config
    from services.cli.plan import Cluster
    from services.cli.start_plan import check_start, side_by_side_memory_note, side_by_side_shortfall
    from services.cli.train import compare_config

    cfg = load_config(CPU_DEFAULT, ["learner.device=cuda"])  # 2 learner ranks on 2 GPUs
    both = [cfg, compare_config(cfg, "grpo")]
    four = Cluster("ray", [{"CPU": 8.0, "GPU": 4.0, "memory": 64 * GiB, "custom": {}}])
    assert side_by_side_shortfall(check_start(both, "ray", four), 4, 8.0) is None
    two = Cluster("ray", [{"CPU": 8.0, "GPU": 2.0, "memory": 64 * GiB, "custom": {}}])
    plans = check_start(both, "ray", two)  # each fits alone
    assert side_by_side_shortfall(plans, 4, 8.0) == "fewer than the 4 GPUs two runs at once reserve"
    assert side_by_side_shortfall(plans, 4, 3.0) == "fewer than the 4 CPUs two runs at once reserve"
    assert side_by_side_shortfall([], 4, 8.0) is None  # --skip-plan: CPUs only
    # each run alone peaks at 3.8 GiB; both at once 5.6 (the driver, Ray and the reward replica once)
    small = Cluster("ray", [{"CPU": 8.0, "GPU": 4.0, "memory": 5 * GiB, "custom": {}}])
    note = side_by_side_memory_note(check_start(both, "ray", small))
    assert note.startswith("side by side the two runs may need ") and "the cluster has 5.0 GiB" in note


def test_a_config_json_without_the_shape_is_planned_without_memory(tmp_path):
    """A model directory whose config.json lacks a Qwen2/Llama key: the run is planned without a
    memory estimate (a note) instead of failing on the missing key."""
    from services.cli.config_file import load_config
    from services.cli.start_plan import check_start

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 4096}))
    cfg = load_config(CPU_DEFAULT, [f"model.path={tmp_path}"])
    (plan,) = check_start([cfg], "local", _describe(2.0, strict=False))
    assert plan.shape is None and not plan.memory
    assert any("does not give the shape ('num_attention_heads' missing or invalid)" in w for w in plan.warnings)
