"""Shared test setup: offline libraries, one Ray head node per session, GPU tests skipped without CUDA."""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never write into the user's home: every job gets its output root from a tmp_path fixture.
os.environ.pop("VGMEDGEN_OUTPUT_ROOT", None)
os.environ.pop("RAY_ADDRESS", None)
# The tests' Ray head node runs with token authentication. Ray's C++ core reads the mode and token once,
# when `ray` is first imported, so both are set here, before any test module imports it, for this process
# and every subprocess it starts (job drivers, `ray job submit`).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)

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
def ray_head():
    """The session's one Ray head node (see ``tests/raycluster.py``), this process connected to it as a driver.

    Its address and token go into this process's environment, so job subprocesses and ``ray job submit``
    started by tests reach the same cluster.
    """
    import ray
    from raycluster import HeadNode

    if ray.is_initialized():
        pytest.fail(
            "a Ray instance was started before the tests' head node: a test used Ray without `ray_cluster`"
        )
    head = HeadNode.start(num_cpus=RAY_CPUS, token=os.environ["RAY_AUTH_TOKEN"])
    saved = {k: os.environ.get(k) for k in head.client_env()}
    os.environ.update(head.client_env())
    ray.init(address=head.address, log_to_driver=False)
    try:
        yield head
    finally:
        ray.shutdown()
        head.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


RAY_CPUS = 2


@pytest.fixture()
def ray_cluster(ray_head, request: pytest.FixtureRequest):
    """A Ray test's cluster, with the CPUs it needs free (``@pytest.mark.ray_cpus(n)``; default: all).

    A leaked actor or placement group from an earlier test would otherwise hang this one until its
    timeout; here it fails at once, naming what holds the CPUs.
    """
    import ray

    marker = request.node.get_closest_marker("ray_cpus")
    need = float(marker.args[0]) if marker else float(RAY_CPUS)
    deadline = time.monotonic() + 20  # resources of a finished test are released asynchronously
    while (free := ray.available_resources().get("CPU", 0.0)) < need and time.monotonic() < deadline:
        time.sleep(0.5)
    if free < need:
        from ray.util.state import list_actors, list_placement_groups

        actors = [f"{a.class_name} ({a.state})" for a in list_actors(filters=[("state", "!=", "DEAD")])]
        groups = [g.placement_group_id for g in list_placement_groups(filters=[("state", "=", "CREATED")])]
        pytest.fail(
            f"{request.node.name} needs {need:g} free CPUs on the tests' Ray cluster but finds {free:g}: an earlier "
            f"test leaked actors {actors or 'none'} / placement groups {groups or 'none'}"
        )
    yield ray


@pytest.fixture()
def output_root(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    root.mkdir()
    return root
