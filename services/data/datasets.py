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

from services.config import CountdownDataConfig, DataConfig, FileDataConfig, WordProblemDataConfig


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

    train, held_out = make_splits(cfg.num_train, cfg.num_eval, cfg.seed, cfg.num_numbers, cfg.max_solutions)

    def items(problems, split):
        return [PromptItem(f"{split}-{i}", p.prompt, p.reference, "countdown") for i, p in enumerate(problems)]

    return items(train, "train"), items(held_out, "eval")


def wordproblem_items(cfg: WordProblemDataConfig) -> tuple[list[PromptItem], list[PromptItem]]:
    """The word problems as math items: the question, the answer as text (as MATH and GSM8K store it)."""
    from services.data.wordproblems import make_splits

    train, held_out = make_splits(cfg.num_train, cfg.num_eval, cfg.seed, cfg.max_number)

    def items(problems, split):
        return [PromptItem(f"{split}-{i}", p.question, str(p.answer), "math") for i, p in enumerate(problems)]

    return items(train, "train"), items(held_out, "eval")


@dataclass(frozen=True)
class FieldSpec:
    """Where a row keeps its prompt and answer (dotted paths), and how the answer is written."""

    prompt_key: str = "prompt"
    answer_key: str = "answer"
    answer_format: str = "plain"  # plain | gsm8k


# The published layouts. DAPO-Math-17k: {"prompt": [{"role": "user", "content": ...}],
# "reward_model": {"ground_truth": ...}}; MATH-500: {"problem", "answer"}; GSM8K: {"question",
# "answer": "<worked solution>\n#### 72"}.
PRESETS: dict[str, FieldSpec] = {
    "dapo_math": FieldSpec("prompt", "reward_model.ground_truth"),
    "math500": FieldSpec("problem", "answer"),
    "gsm8k": FieldSpec("question", "answer", "gsm8k"),
}


def field_spec(cfg: FileDataConfig, split: str) -> FieldSpec:
    """The resolved field settings of the train or the eval file: explicit keys, then the preset's,
    then (for eval) the train file's, then the defaults."""
    train_base = PRESETS[cfg.preset] if cfg.preset else FieldSpec()
    train = FieldSpec(cfg.prompt_key or train_base.prompt_key, cfg.answer_key or train_base.answer_key,
                      cfg.answer_format or train_base.answer_format)
    if split == "train":
        return train
    base = PRESETS[cfg.eval_preset] if cfg.eval_preset else train
    return FieldSpec(cfg.eval_prompt_key or base.prompt_key, cfg.eval_answer_key or base.answer_key,
                     cfg.eval_answer_format or base.answer_format)


def read_records(path: str | Path, split: str = "train") -> list[dict]:
    """Rows of a JSONL, JSON-lines or Parquet file, or of a hub dataset's `split`, as dicts.

    Parquet files and hub names go through `datasets.load_dataset`. JSON lines are parsed here,
    line by line: datasets 5.2's JSON builder retypes values in a column that mixes strings and
    objects (it turned the reference "2" into the integer 2 beside DAPO-style nested answers), and
    a reference must reach the verifier as written; a bad line is named by its number.
    """
    p = Path(path)
    if p.exists():
        if p.suffix in {".jsonl", ".json"}:
            return _json_lines(p)
        if p.suffix == ".parquet":
            return _load_dataset("parquet", str(p), data_files=str(p), split="train")
        raise ValueError(f"{p}: unsupported dataset format {p.suffix!r} (use .jsonl or .parquet)")
    if p.suffix in {".jsonl", ".json", ".parquet"} or p.is_absolute() or str(path).startswith("."):
        raise FileNotFoundError(f"dataset file {p} does not exist")
    return _load_dataset(str(path), f"{path} (split {split})", split=split)  # a hub name: owner/name


def _json_lines(path: Path) -> list[dict]:
    rows = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row is a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _load_dataset(name: str, what: str, **kwargs) -> list[dict]:
    try:
        from datasets import load_dataset
    except ImportError as exc:  # a dependency of the project; missing only in a broken environment
        raise RuntimeError(f"reading {what} needs the `datasets` package: {exc}") from exc
    try:
        return load_dataset(name, **kwargs).to_list()
    except Exception as exc:  # offline hub, unknown name or split, unreadable file: say which and why
        raise ValueError(f"{what}: could not be loaded with datasets.load_dataset: {type(exc).__name__}: {exc}") from exc


def _field(row: dict, key: str, where: str) -> Any:
    value: Any = row
    for i, part in enumerate(key.split(".")):
        if not isinstance(value, dict) or part not in value:
            at = ".".join(key.split(".")[:i]) or "the row"
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{where}: missing field {key!r} ({at} has {have})")
        value = value[part]
    if value is None:  # Parquet stores a struct's missing key as null
        raise ValueError(f"{where}: missing field {key!r} (it is null)")
    return value


def _prompt_text(value: Any, where: str) -> str:
    # DAPO-Math-17k stores chat messages ([{"role": "user", "content": ...}]); MATH stores text.
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(str(m["content"]) for m in value if m.get("role", "user") == "user")
    raise ValueError(f"{where}: prompt must be text or a list of chat messages, got {type(value).__name__}")


def _answer(value: Any, fmt: str, where: str) -> Any:
    if isinstance(value, dict) and "ground_truth" in value:  # DAPO-Math-17k nests it under reward_model
        value = value["ground_truth"]
    if fmt == "gsm8k":
        if not isinstance(value, str) or "####" not in value:
            raise ValueError(f"{where}: a GSM8K answer ends in '#### <number>', got {str(value)[:80]!r}")
        value = value.rsplit("####", 1)[1].strip().replace(",", "")
    return value


def file_items(path: str | Path, cfg: FileDataConfig, split: str) -> list[PromptItem]:
    """The prompt items of one file (or hub split); every error names the file, the row and the field."""
    spec = field_spec(cfg, split)
    rows = read_records(path, cfg.split if split == "train" else cfg.eval_split)
    items = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        prompt = _prompt_text(_field(row, spec.prompt_key, where), where)
        answer = _answer(_field(row, spec.answer_key, where), spec.answer_format, where)
        items.append(PromptItem(f"{split}-{i}", prompt, answer, cfg.task))
    if not items:
        raise ValueError(f"{path}: no rows")
    return items


def load_items(cfg: DataConfig) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, held-out) prompt items for a data config."""
    if isinstance(cfg, CountdownDataConfig):
        return countdown_items(cfg)
    if isinstance(cfg, WordProblemDataConfig):
        return wordproblem_items(cfg)
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
