"""Datasets: the Countdown toy and JSONL/Parquet prompt files, and a resumable prompt stream.

Every prompt becomes a `PromptItem` carrying what the reward server needs to verify an answer
(`task`, `reference`). The stream's position is part of the checkpoint, so a resumed run sees
exactly the prompts it would have seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.config import CountdownDataConfig, DataConfig, FileDataConfig


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the task: its id, text, verifier task name and reference answer."""

    id: str
    prompt: str
    reference: Any
    task: str
    meta: dict = field(default_factory=dict, compare=False)


def countdown_items(cfg: CountdownDataConfig) -> tuple[list[PromptItem], list[PromptItem]]:
    from services.data.countdown import make_splits

    train, held_out = make_splits(cfg.num_train, cfg.num_eval, cfg.seed)

    def items(problems, split):
        return [PromptItem(f"{split}-{i}", p.prompt, p.reference, "countdown") for i, p in enumerate(problems)]

    return items(train, "train"), items(held_out, "eval")


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSONL or Parquet file as dicts; a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if path.suffix in {".jsonl", ".json"}:
        rows = []
        with path.open() as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON object: {exc}") from exc
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported dataset format {path.suffix!r} (use .jsonl or .parquet)")


def _prompt_text(value: Any, path: Path, row: int) -> str:
    # DAPO-Math-17k stores chat messages ([{"role": "user", "content": ...}]); MATH stores text.
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(str(m["content"]) for m in value if m.get("role", "user") == "user")
    raise ValueError(f"{path} row {row}: prompt must be text or a list of chat messages, got {type(value).__name__}")


def _answer(value: Any) -> Any:
    # DAPO-Math-17k nests the answer as {"ground_truth": ...} under reward_model
    if isinstance(value, dict) and "ground_truth" in value:
        return value["ground_truth"]
    return value


def file_items(path: str | Path, cfg: FileDataConfig, split: str) -> list[PromptItem]:
    path = Path(path)
    items = []
    for i, row in enumerate(read_records(path)):
        for key in (cfg.prompt_key, cfg.answer_key):
            if key not in row:
                raise ValueError(f"{path} row {i}: missing field {key!r} (fields: {sorted(row)})")
        items.append(PromptItem(f"{split}-{i}", _prompt_text(row[cfg.prompt_key], path, i), _answer(row[cfg.answer_key]), cfg.task))
    if not items:
        raise ValueError(f"{path}: no rows")
    return items


def load_items(cfg: DataConfig) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, held-out) prompt items for a data config."""
    if isinstance(cfg, CountdownDataConfig):
        return countdown_items(cfg)
    train = file_items(cfg.train_path, cfg, "train")
    held_out = file_items(cfg.eval_path, cfg, "eval") if cfg.eval_path else []
    return train, held_out


class PromptStream:
    """Batches of prompts in a seeded shuffled order, epoch after epoch; resumable."""

    def __init__(self, items: list[PromptItem], batch_size: int, seed: int):
        if not items:
            raise ValueError("no prompts to stream")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[PromptItem]:
        batch = []
        while len(batch) < self.batch_size:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.offset)
            batch.extend(self.items[i] for i in self._order[self.offset : self.offset + take])
            self.offset += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.items) or state["seed"] != self.seed:
            raise ValueError(f"stream state is for {state['size']} items / seed {state['seed']}, "
                             f"not {len(self.items)} / {self.seed}: the dataset or seed changed")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._permutation(self.epoch)
