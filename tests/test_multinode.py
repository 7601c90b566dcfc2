"""Three Ray nodes on 127.0.0.1, each declaring its own custom resource; the toy runs through them
with the learners on one node, the rollout actor on another and the reward server's replica and
the controller on the head: weight sync, entropy publishing and a checkpoint resumed across nodes.
The cluster lives in a child process (tests/multinode.py): this session may hold a local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def test_the_toy_runs_and_resumes_across_three_nodes(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "multinode.py"), str(tmp_path)], capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logs = "\n".join((tmp_path / f"train{i}.log").read_text()[-3000:] for i in range(2))
    assert result["exit"] == [0, 0], logs
    assert result["nodes"] == 3
    places = result["placements"]
    assert places["learner"] == ["learners"] and places["rollout"] == ["rollout"], places
    assert places["reward"] == ["head"] and places["controller"] == ["head"], places
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # two steps, a checkpoint, a second driver that resumed from it: every step once
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # weight sync: each step's samples came from the version the learners had just made
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    # entropy publishing: the controller on the head planned each step from the learners' entropy
    assert all(r["entropy_controlled"] is not None and r["reg_direction"] in ("up", "down") for r in rows)
    assert rows[1]["reg_direction"] == ("up" if rows[0]["entropy_controlled"] <= 0.3 else "down")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed"] is True
