"""Directories that appear only once complete: written under a temporary sibling name, then renamed.

The built models, the warm starts and the exported policy are all published this way, so a
reader (another actor on the node, a resumed run, `from_pretrained`) never sees half a directory,
and a crash leaves at most a dot-named temporary sibling behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def staged_dir(out_dir: Path, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to write into; on a clean exit it replaces `out_dir`
    by a rename, unless `keep_existing(out_dir)` says the directory there is already the wanted one
    (a concurrent builder finished first). On an error nothing is replaced."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            if keep_existing is not None and keep_existing(out_dir):
                return
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
