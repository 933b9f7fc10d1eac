"""Ray Train set-up in one place: the TorchTrainer of a run, and the preamble every worker runs first.

The stages (:mod:`vgmedgen.platform.training.runner`) and the evaluation networks
(:mod:`vgmedgen.platform.training.classify`) build their trainers here, and sweeps pass their
callbacks through the same function, so resources, failure handling and checkpoint retention are
set the same way for every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from vgmedgen.platform.training.config import ScalingOptions

__all__ = ["build_trainer", "worker_session"]


def build_trainer(
    worker: Callable[[dict[str, Any]], None],
    loop_config: Mapping[str, Any],
    scaling: ScalingOptions,
    *,
    name: str,
    storage: Path,
    score_attribute: str,
    score_order: Literal["min", "max"],
    num_to_keep: int,
    datasets: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``TorchTrainer`` running ``worker(loop_config)`` on ``scaling``'s workers.

    Args:
        worker: the function each worker runs (it begins with :func:`worker_session`).
        loop_config: its argument (JSON-able values: it travels to every worker).
        scaling: workers and resources (``num_workers=0``: one worker in the driver's process).
        name: the run name (:mod:`vgmedgen.platform.runs`): Ray Train resumes a run of the same name.
        storage: the directory holding the run's directory.
        score_attribute: the reported metric that ranks checkpoints.
        score_order: whether a lower ("min") or higher ("max") score is better.
        num_to_keep: checkpoints kept: the best by score, and always the latest.
        datasets: Ray Datasets the workers stream their shards of (``ray.train.get_dataset_shard``).
        callbacks: Ray Tune/Train callbacks (sweeps pass theirs).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        worker,
        datasets=dict(datasets) if datasets else None,
        train_loop_config=dict(loop_config),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=num_to_keep,
                checkpoint_score_attribute=score_attribute,
                checkpoint_score_order=score_order,
            ),
            callbacks=list(callbacks) or None,
        ),
    )


@contextmanager
def worker_session(use_gpu: bool, threads: int | None, seed: int) -> Iterator[torch.device]:
    """The preamble of every training worker: its device, its torch thread count, its global seed.

    Yields the device (Ray Train's GPU for this rank when ``use_gpu`` and CUDA is there, else the
    CPU). ``threads`` (None: leave torch's setting) is part of a run's identity where it is set: the
    thread count changes floating-point reduction order. The global RNG is seeded so that nothing a
    task builds depends on what ran before it in the process; the thread count is restored on exit,
    because the in-process run (``num_workers=0``) shares the driver's torch.
    """
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch  # RAY

        device = ray.train.torch.get_device()  # RAY
    else:
        device = torch.device("cpu")
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield device
    finally:
        torch.set_num_threads(threads_before)
