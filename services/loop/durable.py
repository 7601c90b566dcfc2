"""Writing files so that a crash leaves either the old version or the new one, never a torn one.

`os.replace` alone is atomic only in the page cache: after a power loss or a killed VM the new
name may point at an empty file. Checkpoints and the run's JSON files therefore fsync the file,
rename it, and fsync the directory that holds the name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make the names in `path` (creations, renames) durable."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(directory: str | Path, names: list[str]) -> dict[str, int]:
    """fsync each file `directory/name` and the directory itself; returns {name: size in bytes}."""
    sizes = {}
    for name in names:
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            sizes[name] = os.fstat(fd).st_size
        finally:
            os.close(fd)
    fsync_dir(directory)
    return sizes


def write_text(path: str | Path, text: str) -> None:
    """Atomic and durable: a temporary file, fsynced, renamed over `path`, the directory fsynced."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: str | Path, obj: dict, indent: int | None = 2) -> None:
    """`obj` as JSON, atomic and durable (`write_text`)."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")
