"""The entropy-controller benchmark: `best_of` groups, per-group overrides and relative targets in
the runner, the tracking numbers on hand-made runs, the verdicts' criteria, and the report written
from fake run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.experiments.report import tracking as T
from services.experiments.report.controllers import write_report
from services.experiments.report.runs import best_of_runs
from services.experiments.runner import ExperimentSpec, expand, share_dirs

REPO = Path(__file__).resolve().parents[3]


def _spec(tmp_path: Path) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "c", "report": "controllers", "base_config": str(REPO / "deploy/configs/cpu_default.yaml"),
        "output_dir": str(tmp_path / "out"), "steps": 4, "seeds": [0], "final_eval_samples": 64,
        "groups": [
            {"name": "base", "toy": "a", "sections": ["base", "headline"], "algorithm": {"type": "grpo"}, "steps": 0},
            {"name": "grpo", "toy": "a", "sections": ["headline"], "algorithm": {"type": "grpo"}, "seeds": [0, 1]},
            {"name": "bb-mean", "label": "AEPO bang-bang", "toy": "a", "sections": ["tracking"], "relative": True,
             "targets": [0.7, 1.0, 1.2], "algorithm": {"type": "aepo", "prompt_share": 1.0},
             "overrides": {"controller": {"entropy_source": "exact"}}},
            {"name": "bb-content", "label": "AEPO bang-bang", "toy": "a", "sections": ["tracking"], "relative": True,
             "targets": [0.7, 1.0, 1.2], "algorithm": {"type": "aepo", "prompt_share": 1.0},
             "overrides": {"controller": {"entropy_source": "content"}}},
            {"name": "best-bb", "label": "AEPO bang-bang", "toy": "a", "sections": ["headline"], "targets": "best",
             "best_of": ["bb-mean", "bb-content"], "algorithm": {}, "seeds": [0, 1]},
            {"name": "best-bb-hard", "label": "AEPO bang-bang", "toy": "b", "sections": ["headline"], "targets": "best",
             "best_of": ["bb-mean", "bb-content"], "algorithm": {}, "seeds": [0],
             "overrides": {"data": {"num_numbers": 4, "max_solutions": 4}, "rollout": {"max_tokens": 40}}},
        ]})


def _fake_run(job, entropies, targets, pass1=0.3, content=None):
    """Write a finished run's files for `job`: rows with the controlled signal and its target."""
    d = Path(job.config["trainer"]["output_dir"])
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"step": i, "entropy": h, "entropy_controlled": h, "entropy_target": t,
             "token_entropy": {"irrelevant": h / 2, "content": (content or h / 2), "forking": 2 * h}}
            for i, (h, t) in enumerate(zip(entropies, targets))]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {"step": len(rows), "eval_avg@64": 0.4, **{f"eval_pass@{k}": min(1.0, pass1 * k ** 0.3) for k in (1, 4, 16, 64)}}
    (d / "eval.jsonl").write_text(json.dumps(final) + "\n")
    (d / "summary.json").write_text(json.dumps({"steps": len(rows)}))
    (d / "run_config.json").write_text(json.dumps({"digest": job.digest, "name": job.name, "wall_seconds": 10.0}))


def test_best_of_groups_repeat_the_best_runs_setting_with_their_own_overrides(tmp_path):
    spec = _spec(tmp_path)
    jobs = expand(spec, tmp_path / "out")
    assert not any(j.group.name.startswith("best") for j in jobs)
    bb = {j.name: j for j in jobs if j.group.name.startswith("bb")}
    assert bb["bb-content-h1.2-s0"].config["algorithm"]["target"] == {"type": "constant", "value": 1.2, "relative": True}
    assert bb["bb-content-h1.2-s0"].config["controller"]["entropy_source"] == "content"
    assert best_of_runs(spec, jobs) == {}  # nothing finished: nothing chosen
    for name, job in bb.items():
        _fake_run(job, [0.5] * 4, [None, 0.4, 0.4, 0.4], pass1=0.5 if name == "bb-content-h1.2-s0" else 0.3)
    best = best_of_runs(spec, jobs)
    assert best == {"best-bb": ("bb-content", 1.2), "best-bb-hard": ("bb-content", 1.2)}
    later = expand(spec, tmp_path / "out", best_runs=best)
    share_dirs(later)
    b0 = next(j for j in later if j.name == "best-bb-h1.2-s0")
    assert b0.digest == bb["bb-content-h1.2-s0"].digest  # seed 0 of the headline row is the grid's run
    hard = next(j for j in later if j.group.name == "best-bb-hard")
    assert hard.config["controller"]["entropy_source"] == "content" and hard.config["data"]["num_numbers"] == 4
    assert hard.config["algorithm"]["target"]["relative"] is True and hard.config["rollout"]["max_tokens"] == 40


def test_best_of_must_name_known_groups_with_targets_best(tmp_path):
    raw = _spec(tmp_path).model_dump()
    raw["groups"][4]["best_of"] = ["nope"]
    with pytest.raises(ValueError, match="unknown: \\['nope'\\]"):
        ExperimentSpec.model_validate(raw)


def _run(hs, ts, steps=None):
    return {"rows": [{"step": i if steps is None else steps[i], "entropy_controlled": h, "entropy_target": t}
                     for i, (h, t) in enumerate(zip(hs, ts))]}


def test_tracking_numbers_are_relative_to_the_target():
    # target 0.5 from step 1; steps 0..5, second half = steps >= 2.5: |0.45-0.5|, |0.5-0.5|, |0.52-0.5| over 0.5
    run = _run([0.8, 0.6, 0.45, 0.45, 0.5, 0.52], [None, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert T.base_value(run) == 0.8
    assert T.tracking_error(run) == pytest.approx((0.05 + 0.0 + 0.02) / 3 / 0.5)
    assert T.overshoot(run) == pytest.approx(0.05 / 0.5)  # crossed at step 2, lowest 0.45
    assert T.settling_step(run) == 4  # within 5 % (0.025) from step 4 on
    never = _run([0.8, 0.7, 0.6], [None, 0.5, 0.5])
    assert T.overshoot(never) == 0.0 and T.settling_step(never) is None


def _eval_run(p64, content=None):
    return {"final": {"eval_pass@64": p64, "eval_pass@1": p64 / 3},
            "rows": [{"step": i, "token_entropy": {"content": content}} for i in range(3)]}


def test_the_verdicts_follow_their_stated_criteria():
    at = {c: {"content": _eval_run(0.9), "exact": _eval_run(0.85)} for c in ("a", "b", "c")}
    at["d"] = {"content": _eval_run(0.8), "exact": _eval_run(0.9)}
    assert T.verdict_content_vs_mean(at)[1] == "holds"  # 3 of 4 better by 0.05 > 0.02
    at["c"] = {"content": _eval_run(0.86), "exact": _eval_run(0.85)}
    assert T.verdict_content_vs_mean(at)[1] == "not supported"
    grpo = [_eval_run(0.8, 0.13), _eval_run(0.8, 0.14)]  # spread 0.005: need max(0.02, 0.015)
    assert T.verdict_aepo_moves_content(_eval_run(0.8, 0.12), _eval_run(0.8, 0.15), grpo)[1] == "holds"
    assert T.verdict_aepo_moves_content(_eval_run(0.8, 0.13), _eval_run(0.8, 0.145), grpo)[1] == "refuted"
    aepo = [_eval_run(0.9), _eval_run(0.96)]  # pass@1 0.30 / 0.32: 0.31 ± 0.01
    bonus = [_eval_run(0.75), _eval_run(0.78)]  # 0.25 / 0.26: 0.255 ± 0.005
    assert T.verdict_aepo_vs_bonus({"x": (aepo, bonus)})[1] == "AEPO better"
    assert T.verdict_aepo_vs_bonus({"x": (aepo, bonus), "y": (bonus, aepo)})[1] == "mixed"
    assert T.verdict_aepo_vs_bonus({"x": (aepo, aepo)})[1] == "no difference"


def test_the_report_is_written_from_the_runs_files(tmp_path):
    spec = _spec(tmp_path)
    jobs = expand(spec, tmp_path / "out")
    for j in jobs:
        if j.config["trainer"]["steps"] == 0:
            _fake_run(j, [], [])
        elif j.target is None:
            _fake_run(j, [0.5, 0.45, 0.4, 0.35], [None] * 4)
        else:
            _fake_run(j, [0.5, 0.45, 0.5 * j.target, 0.5 * j.target], [None] + [0.5 * j.target] * 3)
    jobs = expand(spec, tmp_path / "out", best_runs=best_of_runs(spec, jobs))
    path = write_report(spec, jobs, tmp_path / "out", spec_path="spec.yaml")
    text = path.read_text()
    assert "| AEPO bang-bang | content | 0.500 | 1.2 × H0 | 0.600 |" in text and "| 1.0 × H0 |" in text
    assert "Reachable targets" in text and "### Task `a`" in text and "## 5. Verdicts" in text
    assert (tmp_path / "out" / "fig_tracking.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "verdicts.json").read_text())
