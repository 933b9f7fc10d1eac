"""Shared set-up of the Serve tests: tiny model versions (two of them registered in a real MLflow
store) and a running application on the tests' head node, reached over real HTTP on 127.0.0.1.

Test deployments take at most 0.25 CPU per replica and every application ends with ``serve.shutdown()``,
so the training and data tests that run later still find the head node's CPUs free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from raycluster import free_port
from test_model_version import ANATOMY, CAPTIONS, STYLE, make_text_encoder, make_trained_model

from vgmedgen.platform.config import ExperimentConfig

__all__ = ["ANATOMY", "CAPTIONS", "STYLE", "ServeModels", "running_app", "serve_models"]

EXPERIMENT = "vgmedgen"
REGISTERED = f"vgmedgen-{EXPERIMENT}"  # the train job's registry name for experiment 'vgmedgen'


@dataclass
class ServeModels:
    root: Path
    versions: list[Path]  # v0 (a directory), v1 and v2 (registered as versions 1 and 2 later)

    def register(self, index: int) -> str:
        """Register ``versions[index]`` and point ``<REGISTERED>@current`` at it; returns its registry version."""
        from vgmedgen.platform.tracking import Tracker, TrackingConfig

        tracker = Tracker(TrackingConfig(), self.root, EXPERIMENT)
        with tracker.open_run(key=f"serve-test-{index}", name=f"train-{index}") as run_id:
            tracker.log_artifacts(run_id, self.versions[index], "model_version")
            return tracker.register(run_id, "model_version")


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory: pytest.TempPathFactory) -> ServeModels:
    encoder = make_text_encoder(tmp_path_factory.mktemp("serve-bert"))
    base = tmp_path_factory.mktemp("serve-models")
    versions = []
    for seed in range(3):
        model = make_trained_model(encoder, {"sampler": {"num_steps": 2}}, seed=seed)
        versions.append(base / f"v{seed}")
        model.save_pretrained(versions[-1])
    models = ServeModels(tmp_path_factory.mktemp("serve-root"), versions)
    models.register(1)
    _write_records(experiment(models).records_dir)
    return models


def _write_records(directory: Path) -> None:
    """A few train records (prompts only matter): where ``GET /v1/models`` finds its example prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vgmedgen.platform.records import RECORD_SCHEMA

    rows = [
        {"id": f"r{i}", "dataset": "synthderm", "split": "train", "group": f"g{i}", "label": "nevus",
         "image": b"", "mask": None, "caption": f"{a}. {s}", "anatomy_text": a, "style_text": s,
         "attributes": "{}", "source": "test"}
        for i, (a, s) in enumerate(zip(ANATOMY, STYLE))
    ]  # fmt: skip
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), directory / "part-0.parquet")


def experiment(store: ServeModels, **serve: Any) -> ExperimentConfig:
    """The tests' experiment: v0's directory (the default) and ``<REGISTERED>@current`` served."""
    settings: dict[str, Any] = {
        "models": [str(store.versions[0]), f"{REGISTERED}@current"],
        "port": free_port(),
        "num_cpus": 0.25,
        "ingress_num_cpus": 0.1,
        "alias_refresh_s": 0,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "queue": {"max_ongoing_requests": 8, "max_queued_requests": 256, "retry_after_s": 1},
        "limits": {"max_images": 8, "max_steps": 8, "max_grid_cells": 16, "max_job_images": 32,
                   "max_body_bytes": 256 * 1024},
        "jobs": {"result_ttl_s": 600, "max_jobs": 8},
        **serve,
    }  # fmt: skip
    return ExperimentConfig.model_validate(
        {"name": EXPERIMENT, "output_root": str(store.root), "serve": settings}
    )


@contextlib.contextmanager
def running_app(cfg: ExperimentConfig) -> Iterator[str]:
    """Deploy ``cfg``'s application; yields its base URL; ends with ``serve.shutdown()``."""
    from ray import serve

    from vgmedgen.serve.app import shutdown, start

    urls = start(cfg)
    try:
        yield urls["url"].rstrip("/")
    finally:
        shutdown(cfg)
        serve.shutdown()


def wait_ready(base: str, timeout_s: float = 60.0, headers: dict[str, str] | None = None) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if requests.get(f"{base}/readyz", headers=headers, timeout=5).status_code == 200:
            return
        time.sleep(0.3)
    raise AssertionError(f"{base}/readyz never answered 200")
