"""Atomic output files: all renamed into place only once all are written, with the usual file mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lipcert import atomic


def test_new_files_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic.write_files_atomic({tmp_path / "a.json": b"{}", tmp_path / "sub" / "b.md": b"# b"})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_bytes() == b"{}" and (tmp_path / "sub" / "b.md").read_bytes() == b"# b"
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "a.json", tmp_path / "sub" / "b.md")} == {0o644}


def test_a_failure_while_writing_keeps_every_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "report.json", tmp_path / "report.md"
    first.write_text("old json")
    second.write_text("old md")
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        atomic.write_files_atomic({first: b"new json", second: b"new md"})
    assert first.read_text() == "old json" and second.read_text() == "old md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no temporary left
