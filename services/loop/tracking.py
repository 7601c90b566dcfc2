"""Experiment loggers beside metrics.jsonl: TensorBoard event files, W&B in offline mode.

`trainer.loggers` picks them; each gets every metrics row as it is written, flattened to scalars
(`time/rollout`, `token_entropy/content`, `eval_pass@8`, ...), at the row's step. metrics.jsonl
stays the record (resume truncates it; these loggers only append). A logger whose package is
missing fails at the start of the run with the command that installs it, never mid-run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Protocol


class ExperimentLogger(Protocol):
    """Receives each metrics row."""

    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every finite number of a metrics row (nested dicts as `a/b`; lists by index; bools as 0/1)."""
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{name}/")
        elif isinstance(value, list):
            yield from scalars({str(i): v for i, v in enumerate(value)}, f"{name}/")
        elif isinstance(value, bool):
            yield name, float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            yield name, float(value)


class TensorBoardLogger:
    """Event files under `output_dir/tensorboard` (`tensorboard --logdir runs/`)."""

    def __init__(self, output_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("trainer.loggers has tensorboard, which is not installed: "
                               "pip install tensorboard (or the project's [tracking] extra)") from exc
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, row: dict) -> None:
        step = int(row["step"])
        for name, value in scalars(row):
            if name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run in offline mode under `output_dir/wandb` (`wandb sync` uploads it later)."""

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError("trainer.loggers has wandb, which is not installed: pip install wandb") from exc
        self.run = wandb.init(mode="offline", dir=str(output_dir), name=run_name, config=config, project="aepo-ray")

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in scalars(row) if k != "step"}, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def make_loggers(names: list[str], output_dir: Path, run_name: str, config: dict[str, Any]) -> list[ExperimentLogger]:
    """The loggers `trainer.loggers` names, in order."""
    made: list[ExperimentLogger] = []
    for name in names:
        made.append(TensorBoardLogger(output_dir) if name == "tensorboard" else WandbLogger(output_dir, run_name, config))
    return made
