"""What the shared training loop needs of Ray Train's context, without Ray: rank, world size, the latest
checkpoint and ``report``. Checkpoints are copied to ``<store>/ckpt-<step>`` as Ray Train would persist them."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path


class LocalCheckpoint:
    """A checkpoint directory with Ray's ``as_directory`` interface."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.path)


class LocalContext:
    """Rank ``rank`` of ``world``; reported checkpoints land in ``store`` and the newest is handed back."""

    def __init__(self, store: Path, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world, self.store = rank, world, store
        store.mkdir(parents=True, exist_ok=True)

    def latest_checkpoint(self):
        found = sorted(self.store.glob("ckpt-*"))
        return LocalCheckpoint(found[-1]) if found else None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.store / f"ckpt-{metrics['step']:04d}")
