"""How outputs are written: directories that appear all at once, and the stable hashes that name them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_directory",
    "atomic_write_text",
    "file_digest",
    "row_key",
    "stable_hash",
    "stable_int",
    "text_digest",
]


def stable_hash(obj: Any, length: int = 10) -> str:
    """A short, stable hash of a JSON-serialisable object (keys sorted): run names and cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def stable_int(text: str) -> int:
    """A stable 32-bit integer of a string (the first 4 bytes of its sha256, big-endian): choices that
    must not change between processes, unlike Python's ``hash``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def row_key(seed: int, row_id: object, nbytes: int = 8) -> int:
    """A pseudo-random unsigned key of ``nbytes`` for a row: BLAKE2b of (seed, ``str(row_id)``), little-endian.
    It depends only on its arguments, so a sample drawn by smallest keys is the same on any shard layout."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{row_id}".encode(), digest_size=nbytes).digest()
    return int.from_bytes(digest, "little")


def text_digest(text: str) -> str:
    """The sha256 hex digest of a string's UTF-8 bytes (a secret compared without keeping it, a body's identity)."""
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes (read in blocks): a file's content identity."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Write ``directory`` all at once: fill the empty sibling this yields; on success it replaces
    ``directory``, on an error it is removed and ``directory`` stays as it was. A reader therefore
    never sees a half-written directory, and a crash leaves only a dot-named ``.tmp`` sibling that
    the next attempt clears."""
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file all at once (a sibling temporary file, then a rename): a reader, or a job killed
    mid-write, never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
