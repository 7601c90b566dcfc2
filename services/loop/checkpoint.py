"""Checkpoints of a run: the learners' sharded state plus the driver's (data position, RNG, controller).

A checkpoint is committed in this order, so a crash at any point leaves the previous one usable:
every learner rank writes and fsyncs its shard files (and its own RNG state) under a temporary
directory and reports their sizes; the driver checks every rank's files are there, writes
`driver_state.json` with that manifest, fsyncs, renames the directory to `step_NNNNNN` and only
then points `latest.json` at it. Resume takes the newest checkpoint whose manifest checks out and
falls back to the one before when it does not (a torn copy, a deleted shard), saying so.

The driver's state holds the metrics row of the checkpoint's last step, so a kill between the
checkpoint and that row's append loses nothing: resume writes it back. Resume truncates the logs
to the checkpoint's step, so every step appears exactly once.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.loop.durable import fsync_dir, write_json

if TYPE_CHECKING:
    from services.loop.trainer import Trainer

log = logging.getLogger("aepo")

DRIVER_STATE = "driver_state.json"


class NoCheckpoint(RuntimeError):
    """There is nothing to resume from (no checkpoint, or none that is intact)."""


def nothing_to_resume(output_dir: str | Path, save_every: int) -> NoCheckpoint:
    """The error `--resume` gives for a directory without an intact checkpoint."""
    return NoCheckpoint(f"nothing to resume in {output_dir}: no intact checkpoint under {checkpoint_root(output_dir)} "
                        f"(the run checkpoints every {save_every} steps); start it again with --overwrite")


def checkpoint_root(output_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(output_dir) / "checkpoints"


def snapshot(trainer: "Trainer") -> dict:
    """The driver's part of a checkpoint: where the run is, its RNGs and the controller's state."""
    return {
        "step": trainer.step,
        "policy_version": trainer.policy_version,
        "stream": trainer.stream.state_dict(),
        "python_rng": _jsonable_rng(random.getstate()),
        "torch_rng": torch.get_rng_state().tolist(),
        "controller": trainer.parts.controller.state(),
    }


def save(trainer: "Trainer", row: dict | None = None) -> Path:
    """Commit a checkpoint of the run after `trainer.step` steps; `row` is that step's metrics row."""
    root = checkpoint_root(trainer.output_dir)
    final = root / f"step_{trainer.step:06d}"
    tmp = root / f".tmp_step_{trainer.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = trainer.parts.learner.save(str(tmp / "learner")) or {}
    on_disk = {p.name: p.stat().st_size for p in (tmp / "learner").glob("*") if p.is_file()}
    short = {name: size for name, size in written.items() if on_disk.get(name) != size}
    if short:  # a shard the driver cannot see whole (a node-local disk, a failed write): do not commit
        raise RuntimeError(f"checkpoint {final.name}: learner files missing or short where the driver reads them: {short}")
    state = {**snapshot(trainer), "config": trainer.cfg.model_dump(mode="json"), "row": row,
             "manifest": {f"learner/{k}": v for k, v in written.items()}}
    write_json(tmp / DRIVER_STATE, state, indent=None)
    fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(root)
    write_json(root / "latest.json", {"step": trainer.step, "path": final.name})
    keep = trainer.cfg.trainer.keep_checkpoints
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def intact(path: Path) -> dict:
    """The driver state of checkpoint `path`, after checking every file of its manifest is there
    with its size; raises ValueError saying what is wrong."""
    try:
        state = json.loads((path / DRIVER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name}: {DRIVER_STATE} unreadable ({exc})") from None
    for name, size in state.get("manifest", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise ValueError(f"{path.name}: {name} missing or not {size} bytes")
    return state


def latest_intact(output_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that checks out (latest.json's first, then by step), or None."""
    root = checkpoint_root(output_dir)
    order = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    try:
        named = root / json.loads((root / "latest.json").read_text())["path"]
        order = [named] + [p for p in order if p != named]
    except (OSError, ValueError, KeyError):
        pass
    for path in order:
        try:
            return path, intact(path)
        except ValueError as exc:
            log.warning("checkpoint %s is damaged (%s); falling back to the one before", path, exc)
    return None


def saved_run_id(output_dir: str | Path) -> str | None:
    """The run id a resumed run continues (its controller state's), or None without a checkpoint."""
    found = latest_intact(output_dir)
    return found[1]["controller"].get("run_id") if found else None


def resume(trainer: "Trainer") -> bool:
    """Continue from the newest intact checkpoint; False when there is none."""
    found = latest_intact(trainer.output_dir)
    if found is None:
        return False
    path, state = found
    trainer.parts.learner.load(str(path / "learner"))
    restore(trainer, state)
    if state.get("row") is not None and trainer.log.last_step() != state["step"] - 1:
        trainer.log.append(state["row"])  # killed between the checkpoint and its row
    return True


def restore(trainer: "Trainer", state: dict) -> None:
    """Put the driver, the controller and the engines where `state` says, and cut the logs there
    (the learners hold the matching weights already)."""
    trainer.step, trainer.policy_version = state["step"], state["policy_version"]
    trainer.stream.load_state_dict(state["stream"])
    random.setstate(_rng_from_json(state["python_rng"]))
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    trainer.parts.controller.restore(state["controller"])
    trainer.parts.rollout.load_weights(trainer.policy_version, trainer.parts.learner.full_weights())
    trainer.log.truncate_after(trainer.step - 1)
    trainer.eval_log.truncate_after(trainer.step)
    trainer.sample_log.truncate_after(trainer.step - 1)


def _jsonable_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
