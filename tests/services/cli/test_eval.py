"""`aepo eval`: avg@n and unbiased pass@k of a checkpoint on a benchmark file, verified over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.evaluate import score
from services.contracts import Sample

ROOT = Path(__file__).resolve().parents[3]


def _s(outcome: str, length: int = 3, finish: str = "stop") -> Sample:
    return Sample(None, [1], [4] * length, finish, 1.0, 0, "hf", outcome=outcome)


def test_scores_by_hand():
    # prompt A: 2 of 4 correct; prompt B: none (one timeout, one truncated)
    samples = [_s("correct"), _s("incorrect"), _s("correct"), _s("unparsable", 5, "length"),
               _s("incorrect"), _s("timeout"), _s("incorrect"), _s("incorrect", 9, "length")]
    out = score(samples, n_prompts=2, n=4)
    assert out["avg@4"] == pytest.approx(0.25)
    assert out["pass@1"] == pytest.approx(0.25)  # unbiased pass@1 is the mean accuracy
    assert out["pass@2"] == pytest.approx((1 - 1 / 6) / 2)  # A: 1 - C(2,2)/C(4,2); B: 0
    assert out["pass@4"] == pytest.approx(0.5)
    assert set(out) >= {"avg@4", "pass@1", "pass@2", "pass@4"} and "pass@8" not in out
    assert out["outcomes"] == {"correct": 2, "incorrect": 4, "unparsable": 1, "timeout": 1}
    assert out["truncation_rate"] == pytest.approx(2 / 8) and out["response_length_mean"] == pytest.approx(32 / 8)


@pytest.mark.slow
def test_eval_runs_a_checkpoint_on_a_file_through_the_reward_server(tiny_model_path, tmp_path):
    data = tmp_path / "cd.jsonl"
    rows = [{"prompt": p, "answer": {"numbers": n, "target": t, "use_all": True}}
            for p, n, t in (("9,8,3>69|", [9, 8, 3], 69), ("1,2,3>6|", [1, 2, 3], 6), ("4,5,6>120|", [4, 5, 6], 120))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "eval", "--model", tiny_model_path, "--data", str(data), "--task", "countdown",
         "--samples", "4", "--max-tokens", "12", "--batch-prompts", "2", "--no-progress", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["prompts"] == 3 and sum(result["outcomes"].values()) == 12
    assert set(result["outcomes"]) <= {"correct", "incorrect", "unparsable"}  # verdicts, none lost to timeouts
    assert result["pass@1"] == pytest.approx(result["avg@4"]) and result["pass@1"] <= result["pass@2"] <= result["pass@4"]
    bad = subprocess.run([sys.executable, "-m", "services.cli", "eval", "--model", tiny_model_path, "--data", str(data),
                          "--preset", "math500"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "row 0: missing field 'problem'" in bad.stderr
