"""How outputs are written: directories that appear all at once, and the stable hashes that name them."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "stable_hash"]


def stable_hash(obj: Any, length: int = 10) -> str:
    """A short, stable hash of a JSON-serialisable object (keys sorted): run names and cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


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
