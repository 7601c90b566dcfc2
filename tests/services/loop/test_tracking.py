"""Experiment loggers beside metrics.jsonl: TensorBoard event files hold the same numbers."""

from __future__ import annotations

import json

import pytest

from services.loop.tracking import scalars


def test_rows_flatten_to_finite_scalars():
    row = {"step": 3, "entropy": 0.4, "time": {"rollout": 1.5}, "token_entropy": {"content": 0.2}, "ok": True,
           "entropy_by_position": [0.5, None], "algorithm": "aepo", "nan": float("nan"), "reward_failures": {"timeout": 2}}
    assert dict(scalars(row)) == {"step": 3.0, "entropy": 0.4, "time/rollout": 1.5, "token_entropy/content": 0.2, "ok": 1.0,
                                  "entropy_by_position/0": 0.5, "reward_failures/timeout": 2.0}


def test_tensorboard_event_files_carry_every_metrics_row(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_trainer import build, make_cfg

    trainer, _ = build(tmp_path, make_cfg(trainer={"steps": 3, "loggers": ["tensorboard"]}), entropies=(0.5, 0.2, 0.4))
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"entropy", "reg_temperature", "time/rollout", "reward_mean", "truncation_rate"} <= tags
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("entropy")] == [(r["step"], round(r["entropy"], 6)) for r in rows]
    assert [e.value for e in acc.Scalars("reg_temperature")] == pytest.approx([r["reg_temperature"] for r in rows])


def test_wandb_offline_runs_get_every_row(tmp_path, monkeypatch):
    """W&B in offline mode (no network): the run directory appears under output_dir/wandb and its
    record log holds the flattened keys and values."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    from test_trainer import build, make_cfg

    trainer, _ = build(tmp_path, make_cfg(trainer={"steps": 2, "loggers": ["wandb"]}), entropies=(0.4375, 0.3125))
    trainer.fit()
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    assert b"time/rollout" in data and b"reg_temperature" in data and b"0.3125" in data and b"0.4375" in data


def test_a_logger_without_its_package_fails_at_the_start(tmp_path, monkeypatch):
    import sys

    from test_trainer import build, make_cfg

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    with pytest.raises(RuntimeError, match="wandb, which is not installed: pip install wandb"):
        build(tmp_path, make_cfg(trainer={"loggers": ["wandb"]}))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
