"""The one training loop every stage runs, under Ray Train, under Tune, or in-process for tests.

Stage-specific work lives in a :class:`StageTask` (``stages.py``): which parameters train, the
loss of a batch, validation, and the exported artefacts. This loop owns everything shared:
deterministic batches and random draws (torch's global RNG too, re-seeded per micro-batch),
gradient accumulation, clipping, the LR schedule, bf16 autocast on CUDA, checkpoints (model, EMA,
optimizer, step, RNG) and resume, fault injection, progress lines, and metrics that reach MLflow
exactly once per step (buffered until the checkpoint that makes them durable, so a restart never
logs a step twice).

Ray calls are marked ``# RAY``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from vgmedgen.platform.checkpoint import (
    checkpoint_step,
    load_state,
    mark_complete,
    newest_complete,
    rng_state,
    save_state,
    set_rng_state,
)
from vgmedgen.platform.training.config import StageTrainConfig
from vgmedgen.platform.training.data import batch_indices, seed_global_rng, step_generator

__all__ = ["StageTask", "TrainContext", "train_loop"]

log = logging.getLogger(__name__)


class StageTask(Protocol):
    """What a stage supplies to the shared loop."""

    name: str

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def wrap_for_ddp(self, prepare: Any) -> None:
        """Wrap the trained module(s) with ``prepare`` (ray.train.torch.prepare_model) for multi-worker runs."""

    def train_size(self) -> int: ...

    def train_batch(self, idx: Any, device: torch.device) -> dict: ...

    def loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample loss terms plus a scalar ``total`` to backpropagate."""

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (EMA update)."""

    def validate(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, directory: Path) -> None:
        """Write this stage's part of the model version (rank 0, after the last step)."""

    def artifacts(self, step: int, directory: Path) -> list[Path]:
        """Images worth logging at this step (sample grids); may return []."""


class TrainContext:
    """Rank, world size and the reporting hooks: Ray Train's when running under it, local ones otherwise.

    Args:
        run_dir: the run's storage directory. Resuming takes the newest checkpoint there that is
            complete (:func:`~vgmedgen.platform.checkpoint.checkpoint_step`) when it is newer than the one
            Ray Train hands back: Ray loses a reported checkpoint when a worker dies before the controller
            has collected every rank's report, and the new worker group would otherwise start over.
    """

    def __init__(self, run_dir: Path | None = None) -> None:
        import ray.train  # RAY

        ctx = ray.train.get_context()  # RAY
        self.rank = ctx.get_world_rank()
        self.world = ctx.get_world_size()
        self.run_dir = run_dir
        self._ray = ray.train

    def latest_checkpoint(self):
        from ray.train import Checkpoint  # RAY

        registered = self._ray.get_checkpoint()  # RAY
        step = _registered_step(registered.path) if registered is not None else None
        found = newest_complete(self.run_dir) if self.run_dir is not None else None
        if found is not None and (registered is None or step is None or found[0] > step):
            if self.rank == 0:
                log.warning(
                    "Ray Train handed back %s; resuming from the newer complete checkpoint %s (step %d), whose "
                    "report was lost when a worker died",
                    registered.path if registered is not None else "no checkpoint",
                    found[1],
                    found[0] + 1,
                )
            return Checkpoint.from_directory(str(found[1]))  # RAY
        return registered

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        from ray.train import Checkpoint  # RAY

        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._ray.report(metrics, checkpoint=ckpt)  # RAY: a barrier; rank 0 passes the checkpoint


def _registered_step(path: str) -> int | None:
    """The step of a checkpoint Ray Train registered (older checkpoints lack the completeness marker)."""
    step = checkpoint_step(path)
    if step is None:
        try:
            step = int(json.loads((Path(path) / "metrics.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return None
    return step


def _autocast(cfg: StageTrainConfig, device: torch.device):
    use_bf16 = device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _schedule(opt: torch.optim.Optimizer, cfg: StageTrainConfig):
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    return get_constant_schedule_with_warmup(opt, cfg.warmup_steps)


def train_loop(
    task: StageTask,
    cfg: StageTrainConfig,
    seed: int,
    ctx: TrainContext,
    device: torch.device,
    *,
    metrics_sink: Any = None,
    export_dir: Path | None = None,
    fault_marker: Path | None = None,
    batch_source: Any = None,
    prepare_model: Callable[..., Any] | None = None,
) -> dict[str, float]:
    """Run (or resume) one stage to ``cfg.steps`` optimiser steps.

    Torch's global RNG is re-seeded from (seed, micro step, rank) before every micro-batch (dropout draws
    from it) and restored to the caller's state on return.

    Args:
        task: the stage.
        cfg: its optimisation settings.
        seed: the run seed; batches and noise are pure functions of (seed, step, micro-batch, rank).
        ctx: rank/world and reporting.
        device: where to train.
        metrics_sink: ``sink(list_of_(step, metrics)) -> None`` called on rank 0 when a checkpoint makes
            the buffered steps durable (MLflow logging), and with artefacts via ``sink.artifacts(paths)``.
        export_dir: where rank 0 writes the stage's model-version part after the last step.
        fault_marker: a file whose absence at ``cfg.fail_at_step`` triggers one injected failure.
        batch_source: ``source(micro_step, device) -> batch`` (Ray Data shards); None draws deterministic
            batches from the task's in-memory split.
        prepare_model: the DDP wrapper for ``world > 1`` (``ray.train.torch.prepare_model`` when None);
            tests pass one over a process group they made themselves.

    With ``world > 1`` every rank computes the loss of its ``batch_size / (world x grad_accum)`` rows of
    each global micro-batch, DDP averages the gradients, and the logged terms are means over the
    global batch (``torch.distributed`` sums over ranks): the same algorithm as one process on the
    whole batch. Every rank's task must return the same loss keys.

    Returns:
        The last step's metrics.
    """
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        return _train_loop(
            task,
            cfg,
            seed,
            ctx,
            device,
            metrics_sink=metrics_sink,
            export_dir=export_dir,
            fault_marker=fault_marker,
            batch_source=batch_source,
            prepare_model=prepare_model,
        )


def _train_loop(
    task: StageTask,
    cfg: StageTrainConfig,
    seed: int,
    ctx: TrainContext,
    device: torch.device,
    *,
    metrics_sink: Any,
    export_dir: Path | None,
    fault_marker: Path | None,
    batch_source: Any,
    prepare_model: Callable[..., Any] | None,
) -> dict[str, float]:
    params = task.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg)
    start = 0
    ckpt = ctx.latest_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d, "state")
        task.load_state_dict(state["task"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = int(state["step"]) + 1
        if ctx.rank == 0:
            log.info("[%s] resumed from checkpoint at step %d", task.name, start)
            if metrics_sink is not None:
                # The steps this checkpoint made durable: logged now unless they already were (a worker
                # killed between the report and the log would otherwise leave a gap in MLflow).
                with ckpt.as_directory() as d:
                    metrics_sink(_pending_from(Path(d)))
    if start >= cfg.steps:
        if ctx.rank == 0:
            log.info("[%s] already finished (%d steps); nothing to train", task.name, cfg.steps)
            if export_dir is not None:
                task.export(export_dir)  # the driver may have stopped before it recorded the export
        # The last checkpoint's metrics, reported again: the driver (and a sweep's report to Tune) gets the
        # final figures of a run that was stopped after its last checkpoint but before it was marked done.
        with ckpt.as_directory() as d:
            final = {
                k: v for k, v in json.loads((Path(d) / "metrics.json").read_text()).items() if k != "pending"
            }
        ctx.report(final, None)
        return {}

    if ctx.world > 1:
        if prepare_model is None:
            import ray.train.torch  # RAY

            prepare_model = ray.train.torch.prepare_model  # RAY
        task.wrap_for_ddp(prepare_model)

    n = task.train_size() if batch_source is None else 0
    micro = cfg.batch_size // cfg.grad_accum  # global micro-batch; each rank draws micro / world rows
    pending: list[tuple[int, dict[str, float]]] = []
    t_start, samples_done = time.perf_counter(), 0
    metrics: dict[str, float] = {}
    for step in range(start, cfg.steps):
        if (
            cfg.fail_at_step is not None
            and cfg.fail_mode == "raise"
            and step == cfg.fail_at_step
            and fault_marker is not None
        ):
            if not fault_marker.exists():
                fault_marker.parent.mkdir(parents=True, exist_ok=True)
                fault_marker.write_text(str(step))
                raise RuntimeError(f"injected fault at step {step} (train.*.fail_at_step)")
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for k in range(cfg.grad_accum):
            micro_step = step * cfg.grad_accum + k
            if batch_source is None:
                batch = task.train_batch(
                    batch_indices(n, micro, seed, micro_step, ctx.rank, ctx.world), device
                )
            else:
                batch = batch_source(micro_step, device)
            gen = step_generator(seed, micro_step, ctx.rank, device)
            seed_global_rng(seed, micro_step, ctx.rank)
            with _autocast(cfg, device):
                losses = task.loss(batch, gen)
            (losses["total"] / cfg.grad_accum).backward()
            for name, value in losses.items():
                v = value.detach().float()
                sums[name] = sums.get(name, 0.0) + float(v.sum())
                counts[name] = counts.get(name, 0) + v.numel()
        terms = _global_means(sums, counts, ctx.world)
        if cfg.clip_norm is not None:
            terms["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
        opt.step()
        sched.step()
        task.after_step(step)
        samples_done += cfg.batch_size
        elapsed = time.perf_counter() - t_start
        metrics = {f"{task.name}/{k}": v for k, v in terms.items()}
        metrics[f"{task.name}/lr"] = sched.get_last_lr()[0]
        metrics[f"{task.name}/samples_per_s"] = samples_done / max(elapsed, 1e-9)
        metrics[f"{task.name}/peak_rss_mb"] = _peak_rss_mb()
        if start > 0:
            metrics[f"{task.name}/resumed_from_step"] = start  # this attempt began after a restart
        last = step == cfg.steps - 1
        checkpoint_now = (step + 1) % cfg.checkpoint_every == 0 or last
        # Every checkpoint carries the validation metric that ranks it (CheckpointConfig keeps the best).
        if ctx.rank == 0 and ((step + 1) % cfg.val_every == 0 or checkpoint_now):
            metrics.update({f"{task.name}/val_{k}": v for k, v in task.validate().items()})
        if ctx.rank == 0:
            pending.append((step, metrics))
            if (step + 1) % cfg.log_every == 0 or last or step == start:
                eta = elapsed / (step + 1 - start) * (cfg.steps - step - 1)
                _progress(
                    f"[{task.name}] step {step + 1}/{cfg.steps} loss {terms['total']:.4f} "
                    f"{metrics[f'{task.name}/samples_per_s']:.1f} samples/s ETA {_fmt(eta)}"
                )
            if (
                metrics_sink is not None
                and cfg.sample_every
                and (step + 1) % cfg.sample_every == 0
                and not last
            ):
                with tempfile.TemporaryDirectory() as d:
                    metrics_sink.artifacts(task.artifacts(step + 1, Path(d)))
        if checkpoint_now:
            _checkpoint(task, opt, sched, step, metrics, ctx, pending, metrics_sink, cfg, fault_marker)
            pending = []
        elif (step + 1) % cfg.log_every == 0:
            ctx.report({"step": step, **metrics}, None)
    if ctx.rank == 0 and export_dir is not None:
        task.export(export_dir)
        if metrics_sink is not None:
            with tempfile.TemporaryDirectory() as d:
                metrics_sink.artifacts(task.artifacts(cfg.steps, Path(d)))
    return metrics


def global_sum(value: torch.Tensor, world: int) -> torch.Tensor:
    """``value`` summed over the ranks of the process group (itself when ``world == 1`` or no group)."""
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.detach().clone()
        torch.distributed.all_reduce(value)  # a sum over ranks
    return value


def _global_means(sums: dict[str, float], counts: dict[str, int], world: int) -> dict[str, float]:
    """Each term's mean over the global batch: the per-rank sums and counts added over ranks."""
    names = sorted(sums)
    t = torch.tensor([sums[n] for n in names] + [float(counts[n]) for n in names], dtype=torch.float64)
    t = global_sum(t, world).tolist()
    return {n: t[i] / t[len(names) + i] for i, n in enumerate(names) if t[len(names) + i] > 0}


def _pending_from(directory: Path) -> list[tuple[int, dict[str, float]]]:
    try:
        data = json.loads((directory / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    return [(int(step), values) for step, values in data.get("pending", [])]


def _checkpoint(task, opt, sched, step, metrics, ctx, pending, metrics_sink, cfg, fault_marker) -> None:
    with tempfile.TemporaryDirectory() as d:
        if ctx.rank == 0:
            state = {
                "task": task.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rng_state(),
                "step": step,
            }
            save_state(d, "state", state)
            (Path(d) / "metrics.json").write_text(
                json.dumps(
                    {"step": step, **_finite(metrics), "pending": [[s, _finite(m)] for s, m in pending]}
                )
            )
            mark_complete(d, step)  # last: a copy without it, or with other sizes, is incomplete
        ctx.report({"step": step, **_finite(metrics)}, d if ctx.rank == 0 else None)
    if (
        cfg.fail_mode == "sigkill"
        and cfg.fail_at_step == step + 1
        and ctx.rank == 0
        and fault_marker is not None
        and not fault_marker.exists()
    ):
        # As a lost node: no exception, no clean-up, right after the report (before MLflow logging).
        fault_marker.parent.mkdir(parents=True, exist_ok=True)
        fault_marker.write_text(str(step + 1))
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if ctx.rank == 0 and metrics_sink is not None and pending:
        metrics_sink(pending)


def _progress(line: str) -> None:
    """One progress line on stdout: the terminal in-process, the worker's log under Ray (which Ray
    forwards to the driver, `ray job logs` and the dashboard).

    Not ``print``: Ray Train 2.60 patches ``print`` in its workers to log the line through Train's
    console handler *and*, because a Ray worker's ``sys.stdout`` is Ray's own wrapper rather than
    ``sys.__stdout__``, to print it as well, so every line appeared twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
