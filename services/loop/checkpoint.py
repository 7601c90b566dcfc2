"""Checkpoints of a run: the learners' sharded state plus the driver's (data position, RNG, controller).

A checkpoint directory exists only once complete (written under a temporary name, then renamed);
`latest.json` names the newest. Resume truncates the logs to the checkpoint's step.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.loop.outputs import write_json

if TYPE_CHECKING:
    from services.loop.trainer import Trainer


def checkpoint_root(trainer: "Trainer") -> Path:
    """Where a run's checkpoints live."""
    return trainer.output_dir / "checkpoints"


def save(trainer: "Trainer") -> Path:
    """Model + optimizer (sharded, by the learners), data position, RNG and controller state."""
    root = checkpoint_root(trainer)
    final = root / f"step_{trainer.step:06d}"
    tmp = root / f".tmp_step_{trainer.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainer.parts.learner.save(str(tmp / "learner"))
    state = {
        "step": trainer.step,
        "policy_version": trainer.policy_version,
        "stream": trainer.stream.state_dict(),
        "python_rng": _jsonable_rng(random.getstate()),
        "torch_rng": torch.get_rng_state().tolist(),
        "controller": trainer.parts.controller.state(),
        "config": trainer.cfg.model_dump(mode="json"),
    }
    write_json(tmp / "driver_state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint exists only once complete
    write_json(root / "latest.json", {"step": trainer.step, "path": final.name})
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[: -trainer.cfg.trainer.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume(trainer: "Trainer") -> bool:
    """Continue from the latest complete checkpoint; False when there is none."""
    latest = checkpoint_root(trainer) / "latest.json"
    if not latest.exists():
        return False
    path = checkpoint_root(trainer) / json.loads(latest.read_text())["path"]
    state = json.loads((path / "driver_state.json").read_text())
    trainer.parts.learner.load(str(path / "learner"))
    trainer.step, trainer.policy_version = state["step"], state["policy_version"]
    trainer.stream.load_state_dict(state["stream"])
    random.setstate(_rng_from_json(state["python_rng"]))
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    trainer.parts.controller.restore(state["controller"])
    trainer.parts.rollout.load_weights(trainer.policy_version, trainer.parts.learner.full_weights())
    trainer.log.truncate_after(trainer.step - 1)
    trainer.eval_log.truncate_after(trainer.step)
    trainer.sample_log.truncate_after(trainer.step - 1)
    return True


def _jsonable_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
