"""Directories written all at once, and stable hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgmedgen.platform.storage import atomic_directory, stable_hash


def test_atomic_directory_replaces_on_success_and_keeps_the_old_on_error(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out"
    with atomic_directory(out) as d:
        assert d != out and d.is_dir() and not out.exists()  # nothing visible until the block ends
        (d / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"

    with pytest.raises(RuntimeError, match="half way"):
        with atomic_directory(out) as d:
            (d / "a.txt").write_text("2")
            raise RuntimeError("half way")
    assert (out / "a.txt").read_text() == "1" and sorted(p.name for p in out.parent.iterdir()) == ["out"]

    (out.parent / ".out.tmp").mkdir()  # a crashed attempt's leftovers are cleared
    (out.parent / ".out.tmp" / "stale.txt").write_text("x")
    with atomic_directory(out) as d:
        (d / "b.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_stable_hash_ignores_key_order_and_has_the_asked_length() -> None:
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash("x")) == 10 and len(stable_hash("x", 16)) == 16
    assert stable_hash("x", 16).startswith(stable_hash("x"))
