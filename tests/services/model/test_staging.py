"""Directories published whole: a crash replaces nothing, a finished write replaces the old one."""

from __future__ import annotations

import pytest

from services.model.staging import staged_dir


def test_a_finished_write_replaces_the_directory_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model-") and not (out / "new.txt").exists()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_crash_mid_write_keeps_the_old_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="died"):
        with staged_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 10)
            raise RuntimeError("died")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_directory_another_builder_finished_is_kept(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "theirs.txt").write_text("done")
    with staged_dir(out, keep_existing=lambda d: (d / "theirs.txt").exists()) as tmp:
        (tmp / "mine.txt").write_text("late")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]
