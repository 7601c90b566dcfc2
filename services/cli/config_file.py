"""Run configs from files: YAML, dotted command-line overrides, and `aepo check-config`.

The schema is services/config.py; this module only reads files into it, so every error names the
file (and the overrides) it came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import yaml
from pydantic import ValidationError

from services.config import TrainConfig


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML run config, with dotted `key.path=value` overrides applied on top (the command
    line's); raise ValueError naming the file and each bad field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a run config is a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        given = f" with overrides {' '.join(overrides)}" if overrides else ""
        raise ValueError(f"{path}{given}: invalid run config:\n{exc}") from exc


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """`a.b.c=value` pairs onto a copy of a raw config mapping, in order; each value is read as YAML
    (`20`, `0.3`, `true`, `null`, `[1, 2]`, `{type: constant, value: 0.3}`, else a string). Missing
    mappings on the path are created; the models then reject unknown keys and bad values."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"override {item!r}: expected key.path=value, e.g. trainer.steps=20")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: the value is not valid YAML: {exc}") from exc
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def check_config_main(args: argparse.Namespace) -> int:
    rc = 0
    for p in args.paths:
        try:
            cfg = load_config(p)
        except (OSError, ValueError) as exc:
            print(exc)
            rc = 1
            continue
        print(f"# {p}: ok")
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return rc
