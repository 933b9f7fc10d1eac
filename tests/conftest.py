"""Shared test setup: offline libraries, one Ray instance per session, GPU tests skipped without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never write into the user's home: every job gets its output root from a tmp_path fixture.
os.environ.pop("VGMEDGEN_OUTPUT_ROOT", None)
os.environ.pop("RAY_ADDRESS", None)

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # Tiny tensors: one thread is faster than two contending ones, and results do not depend on the core count.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray instance for the whole session (two Ray instances on one host misbehave)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def output_root(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    root.mkdir()
    return root
