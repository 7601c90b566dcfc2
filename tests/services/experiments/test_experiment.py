"""The experiment runner (services/experiments/runner.py) and its report (services/experiments/report/).

Pure parts on hand-made inputs; then one real, tiny experiment through `aepo experiment` with
the in-process backend (2 RL steps per run) that checks the report, the run sharing and that a
second invocation runs nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.experiments.report import runs as R
from services.experiments.report.write import write_report
from services.experiments.runner import ExperimentSpec, dedupe, expand, is_done, load_spec, run_dir, share_dirs
from services.loop.outputs import tracking_error

REPO = Path(__file__).resolve().parents[3]


def _spec(tmp_path: Path, base_config: Path, **over) -> ExperimentSpec:
    raw = {
        "name": "t",
        "base_config": str(base_config),
        "output_dir": str(tmp_path / "out"),
        "steps": 2,
        "seeds": [0, 1],
        "groups": [
            {"name": "grpo", "sections": ["table1"], "algorithm": {"type": "grpo"}},
            {"name": "bb", "sections": ["control", "sweep"], "targets": [0.3, 0.5], "seeds": [0],
             "algorithm": {"type": "aepo", "prompt_share": 1.0}},
            {"name": "best", "sections": ["table1"], "targets": "best", "algorithm": {"type": "aepo", "prompt_share": 1.0}},
        ],
    }
    raw.update(over)
    return ExperimentSpec.model_validate(raw)


def test_the_grid_expands_shares_identical_configs_and_waits_for_the_sweep(tmp_path):
    spec = _spec(tmp_path, REPO / "deploy/configs/cpu_default.yaml")
    jobs = expand(spec, tmp_path / "out")
    assert [j.name for j in jobs] == ["grpo-s0", "grpo-s1", "bb-h0.3-s0", "bb-h0.5-s0"]  # 'best' not yet
    assert jobs[2].config["algorithm"]["target"] == {"type": "constant", "value": 0.3}
    assert all(j.config["model"]["init_seed"] == 0 for j in jobs)  # one base model for every seed
    assert jobs[0].config["trainer"]["seed"] == 0 and jobs[1].config["trainer"]["seed"] == 1
    later = expand(spec, tmp_path / "out", best_target=0.5)
    share_dirs(later)
    best0 = next(j for j in later if j.name == "best-h0.5-s0")
    bb05 = next(j for j in later if j.name == "bb-h0.5-s0")
    assert best0.digest == bb05.digest and run_dir(best0) == run_dir(bb05)  # one run serves both
    assert len(dedupe(later)) == len(later) - 1
    assert not is_done(best0)


def test_bad_specs_are_refused_with_the_reason(tmp_path):
    base = REPO / "deploy/configs/cpu_default.yaml"
    with pytest.raises(ValueError, match="unique"):
        _spec(tmp_path, base, groups=[{"name": "a", "sections": ["table1"], "algorithm": {}}] * 2)
    with pytest.raises(ValueError, match="sweep"):
        _spec(tmp_path, base, groups=[{"name": "a", "sections": ["table1"], "targets": "best", "algorithm": {}}])
    (tmp_path / "bad.yaml").write_text("name: x\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="no such"):
        load_spec(tmp_path / "missing.yaml")


def _rows(hs, target=None):
    return [{"step": i, "entropy": h, "entropy_target": target} for i, h in enumerate(hs)]


def test_tracking_error_overshoot_and_settling_by_hand():
    rows = _rows([0.50, 0.40, 0.30, 0.34, 0.36, 0.35], target=0.35)
    # second half: steps 3, 4, 5 -> |−0.01|, |0.01|, 0 -> mean 0.02 / 3
    assert tracking_error(rows) == pytest.approx(0.02 / 3)
    # from above; first below the target at step 2 (0.30): overshoot 0.05
    assert R.overshoot(rows, 0.35) == pytest.approx(0.05)
    # |H − H*| <= 0.02 from step 3 on (step 2 is 0.05 off)
    assert R.settling_step(rows, 0.35) == 3
    assert R.settling_step(_rows([0.5, 0.4, 0.3]), 0.35) is None  # ends outside the band
    assert R.overshoot(_rows([0.5, 0.45, 0.40]), 0.35) == 0.0  # never crosses


def test_mean_spread_and_format():
    assert R.mean_spread([0.2, 0.4, None]) == (pytest.approx(0.3), pytest.approx(0.1), 2)
    assert R.fmt([0.2, 0.4]) == "0.300 ± 0.100" and R.fmt([0.25]) == "0.250" and R.fmt([None]) == "–"


def _fake_run(job, rows, final):
    d = run_dir(job)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text(json.dumps({"step": len(rows), **final}) + "\n")
    (d / "summary.json").write_text(json.dumps({"steps": len(rows)}))


def test_the_report_computes_its_verdicts_from_the_run_files(tmp_path):
    """Hand-made run files: GRPO falls 0.5 -> 0.2 (collapse), AEPO holds 0.3 but not 0.5."""
    spec = _spec(tmp_path, REPO / "deploy/configs/cpu_default.yaml", steps=20)
    jobs = expand(spec, tmp_path / "out")
    share_dirs(jobs)
    fall = [0.5 - 0.3 * i / 19 for i in range(20)]
    for j in jobs:
        if j.group.name == "grpo":
            _fake_run(j, _rows(fall), {"eval_avg@4": 0.5, "eval_pass@1": 0.40 + 0.01 * j.seed, "eval_pass@4": 0.7})
        elif j.target == 0.3:
            _fake_run(j, _rows([0.5] + [0.3] * 19, 0.3), {"eval_avg@4": 0.6, "eval_pass@1": 0.55, "eval_pass@4": 0.8})
        else:
            _fake_run(j, _rows([0.5] + [0.42] * 19, 0.5), {"eval_avg@4": 0.6, "eval_pass@1": 0.50, "eval_pass@4": 0.8})
    assert R.best_sweep_target(jobs) == 0.3
    path = write_report(spec.model_copy(update={"final_eval_samples": 4}), jobs, tmp_path / "out", spec_path="s.yaml")
    text = path.read_text()
    verdicts = {v["claim"].split(".")[0]: v for v in json.loads((tmp_path / "out" / "verdicts.json").read_text())}
    # GRPO's last 10 steps average 0.5 − 0.3 · 14.5 / 19 = 0.271: a fall of 46 % from 0.5
    assert verdicts["1a"]["verdict"] == "reproduced" and "0.500 → 0.271 (-46 %)" in verdicts["1a"]["numbers"]
    assert verdicts["1b"]["verdict"] == "partly" and "H*=0.5: not held" in verdicts["1b"]["numbers"]
    assert "aepo experiment s.yaml" in text and "| GRPO |" not in text  # groups without labels use names
    assert (tmp_path / "out" / "fig_entropy_control.png").exists()


@pytest.mark.slow
def test_a_tiny_experiment_runs_end_to_end_and_resumes(tmp_path, tiny_model_path):
    """Real runs (local backend, 2 steps, random-init tiny model, no warm start)."""
    base = yaml.safe_load((REPO / "deploy/configs/cpu_default.yaml").read_text())
    base["model"] = {"path": tiny_model_path}
    base["data"].update(num_train=64, num_eval=8)
    base["trainer"].update(prompts_per_step=4)
    base["rollout"].update(group_size=4, max_tokens=12)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": "tiny", "base_config": str(tmp_path / "base.yaml"), "output_dir": str(tmp_path / "out"),
        "steps": 2, "seeds": [0], "eval_every": 1, "eval_prompts": 4, "final_eval_samples": 4,
        "final_eval_prompts": 4, "parallel": 2, "threads": 1,
        "groups": [
            {"name": "base", "sections": ["base"], "algorithm": {"type": "grpo"}, "steps": 0},
            {"name": "grpo", "sections": ["table1"], "algorithm": {"type": "grpo"}},
            {"name": "aepo", "sections": ["control", "sweep", "controller"], "targets": [0.5, 5.0],
             "algorithm": {"type": "aepo", "prompt_share": 1.0,
                           "rule": {"type": "pi", "kp": 1.0, "ki": 0.1, "u_max": 2.0}}},
        ],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "services.cli", "experiment", str(tmp_path / "spec.yaml"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    text = (out / "report.md").read_text()
    assert "## 1. Table 1" in text and "## 5. Controllers" in text and "## 4. Where the entropy lives" in text
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 4, runs
    rows = [json.loads(x) for x in next((out / "runs").glob("aepo-h5-s0-*")).joinpath("metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["reg_direction"] == "up" and rows[1]["reg_weight"] > 0  # far below H* = 5: the PI law pushes up
    assert set(rows[0]["token_entropy"]) == {"irrelevant", "content", "forking", "nonforking"}
    evals = [json.loads(x) for x in next((out / "runs").glob("base-s0-*")).joinpath("eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 0 and "eval_pass@4" in evals[-1]  # the base model, at the final-eval settings
    again = subprocess.run(cmd[:-1] + ["--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 runs to do" in again.stdout


def test_the_committed_toy_claims_runs_are_all_found():
    """Every run of deploy/experiments/toy_claims.yaml, the best-target groups included, is done in
    results/toy_claims: a config change that renames the runs (a new setting in the digest) fails here
    instead of making `--report-only` miss them and a rerun redo an hour of work."""
    from services.experiments.report.runs import best_sweep_target

    spec = load_spec(REPO / "deploy/experiments/toy_claims.yaml")
    root = REPO / spec.output_dir
    jobs = expand(spec, root)
    share_dirs(jobs)
    best = best_sweep_target(jobs)
    assert best is not None
    jobs = expand(spec, root, best_target=best)
    share_dirs(jobs)
    missing = [j.name for j in dedupe(jobs) if not is_done(j)]
    assert len(dedupe(jobs)) >= 20 and not missing


def test_the_digest_leaves_out_speed_only_settings_and_nothing_else():
    from services.cli.config_file import load_config
    from services.config import TrainConfig
    from services.experiments.runner import SPEED_ONLY, config_digest

    cfg = load_config(REPO / "deploy/configs/cpu_default.yaml").model_dump(mode="json")
    flipped = json.loads(json.dumps(cfg))
    for section, keys in SPEED_ONLY.items():
        for k in keys:
            value = flipped[section][k]
            flipped[section][k] = (not value if isinstance(value, bool) else ["tensorboard"] if isinstance(value, list)
                                   else {"node_a": 1.0} if isinstance(value, dict)
                                   else "/tmp/hf-cache" if k == "cache_dir"
                                   else "collective" if k == "sync_transport" else 1)
    assert config_digest(flipped) == config_digest(cfg)
    other = json.loads(json.dumps(cfg))
    other["learner"]["lr"] = 2e-4
    assert config_digest(other) != config_digest(cfg)
    TrainConfig.model_validate(flipped)  # the flipped config is still a valid one


def test_a_new_setting_at_its_legacy_value_keeps_the_digest_and_names_a_new_run_otherwise():
    """cpu_compute came after the committed runs: float32 (what they computed in) is left out of
    the digest, exactly as if the field did not exist; bfloat16 or auto are different runs."""
    from services.cli.config_file import load_config
    from services.experiments.runner import LEGACY_DEFAULTS, config_digest

    cfg = load_config(REPO / "deploy/configs/cpu_default.yaml").model_dump(mode="json")
    legacy = json.loads(json.dumps(cfg))
    for section, fields in LEGACY_DEFAULTS.items():
        legacy[section].update(fields)
    absent = json.loads(json.dumps(legacy))
    for section, fields in LEGACY_DEFAULTS.items():
        for f in fields:
            del absent[section][f]
    assert config_digest(legacy) == config_digest(absent)
    for section in ("learner", "warm_start"):
        for value in ("bfloat16", "auto"):
            other = json.loads(json.dumps(legacy))
            other[section]["cpu_compute"] = value
            assert config_digest(other) != config_digest(legacy), (section, value)
