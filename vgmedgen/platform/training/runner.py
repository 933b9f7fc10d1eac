"""Driver side of staged training: one TorchTrainer per stage, resumable by deterministic run names.

A stage's run name is ``<experiment>-<stage>-<hash of its identity>`` (:func:`stage_identity`: what
reaches the stage, its inputs' content, world size and threads; not logging or sampler settings), so re-submitting an interrupted job resumes where it
stopped (Ray Train restores the latest checkpoint of a run with the same name and storage path,
and the MLflow run tagged with the same key is reused), re-submitting a finished job trains
nothing and says so, and a changed config starts a new run. ``--fresh`` moves the old run aside.

The stages hand off through directories: ``visual`` exports ``visual/``, ``align`` exports
``text/``, ``dit`` exports ``generator/``; the driver then assembles the model version.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.runs import read_done, stage_identity, stage_run_name, write_done
from vgmedgen.platform.training.config import STAGE_SCORES, STAGES

__all__ = [
    "StageResult",
    "StageInputError",
    "SyntheticRecordsError",
    "check_real_records",
    "check_visual_masks",
    "run_stage",
    "PARTS",
]

log = logging.getLogger(__name__)

# What each stage exports into the model version, and which parts it consumes.
PARTS = {"visual": "visual", "align": "text", "autoencoder": "autoencoder", "dit": "generator"}
NEEDS = {"visual": (), "align": ("visual",), "autoencoder": (), "dit": ("visual", "text")}


class StageInputError(FileNotFoundError):
    """A stage's input checkpoint (an earlier stage's export) is missing; the message says which and how to get it."""


class SyntheticRecordsError(ConfigError):
    """The records VG-MedGen would train on hold generated (``synthetic://``) rows; the message gives the fix."""


def check_real_records(cfg: ExperimentConfig) -> None:
    """Refuse to train VG-MedGen on records that hold synthetic rows (``source`` starting ``synthetic://``).

    A model trained on its own output learns its own artefacts and errors back and drifts from the real
    data (model collapse), and its evaluation would then measure it against itself. Synthetic records are
    for the downstream benchmark only, as extra train rows of a classifier. Reads only the ``source``,
    ``split`` and ``id`` columns.

    Raises:
        SyntheticRecordsError: with the count per split, a few ids, the reason and the fix.
    """
    from vgmedgen.platform.records import SYNTHETIC_SOURCE, read_records

    table = read_records(cfg.records_dir, columns=["id", "split", "source"])
    found = [
        (rid, split)
        for rid, split, source in zip(*(table.column(c).to_pylist() for c in ("id", "split", "source")))
        if source.startswith(SYNTHETIC_SOURCE)
    ]
    if not found:
        return
    per_split = ", ".join(f"{s} {n}" for s, n in sorted(Counter(s for _, s in found).items()))
    raise SyntheticRecordsError(
        f"The records at {cfg.records_dir} hold {len(found)} synthetic rows (source '{SYNTHETIC_SOURCE}...': "
        f"{per_split}; e.g. {', '.join(repr(r) for r, _ in found[:3])}). VG-MedGen must not train on its own "
        "output: it would learn its own artefacts and errors back, and its evaluation would compare it with "
        "itself. Train on records prepared from real data only (data.dataset / data.name naming a directory "
        "written by jobs/prepare.py, without generated rows copied in); synthetic records belong to the "
        "downstream benchmark, as extra train rows of a classifier."
    )


def check_visual_masks(cfg: ExperimentConfig) -> dict[str, dict[str, int]]:
    """Refuse to train the visual stage on records with too few lesion masks (``train.min_mask_fraction``).

    Returns:
        The records' mask census (split -> mask source or "none" -> count), for the run's tags.

    Raises:
        MaskSupervisionError: with the count, the minimum and the fixes (masks, ``data.mask_source=auto``,
            a lower minimum).
    """
    from vgmedgen.platform.datasets.masks import (
        NO_MASK,
        check_mask_supervision,
        mask_line,
        records_mask_census,
    )

    census = records_mask_census(cfg.records_dir)
    check_mask_supervision(census, cfg.train.min_mask_fraction, cfg.data.dataset, cfg.records_dir)
    if census.get("train", {}).get(NO_MASK):
        log.warning(
            "%s; train.min_mask_fraction=%g lets the visual stage train with these, but the records without "
            "one give its segmentor no Dice supervision",
            mask_line(census),
            cfg.train.min_mask_fraction,
        )
    return census


@dataclass
class StageResult:
    stage: str
    run_name: str
    export_dir: Path
    trained: bool
    metrics: dict[str, float]
    mlflow_run_id: str | None = None


def run_stage(
    cfg: ExperimentConfig,
    stage: str,
    inputs: dict[str, Path],
    *,
    tracker: Any = None,
    parent_run_id: str | None = None,
    fresh: bool = False,
    objective: Any = None,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """Train one stage (or find it finished) and return where its export lies.

    Args:
        cfg: the experiment.
        stage: "visual", "align", "autoencoder" or "dit".
        inputs: part name -> directory of the earlier stages' exports this stage consumes.
        tracker: a :class:`vgmedgen.platform.tracking.Tracker`, or None to log nowhere.
        parent_run_id: the job's MLflow parent run.
        fresh: move an existing run of the same name aside and start anew.
        objective: a sweep's :class:`~vgmedgen.platform.tuning.objective.ObjectiveSpec`, measured by the dit
            stage with every validation (``dit/val_objective``).
        callbacks: Ray Train callbacks of the stage's trainer (a sweep's report to Tune).
    """
    from vgmedgen.platform.tracking import open_run

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    needs = NEEDS[stage]
    if stage == "dit" and cfg.model.generator.autoencoder is not None:
        needs = (*needs, "autoencoder")
    for part in needs:
        d = inputs.get(part)
        if d is None or not (Path(d) / "manifest.json").is_file():
            raise StageInputError(
                f"Stage '{stage}' needs the '{part}' part of an earlier stage, but {d or 'nothing'} holds no "
                f"exported '{part}' (manifest.json missing). Run the earlier stages too (train.stages) or set "
                "train.init_from to a model version that has it."
            )
    storage = cfg.root / "runs"
    name = stage_run_name(cfg, stage, inputs)
    if read_done(storage / name) is None:
        check_real_records(
            cfg
        )  # before any run is opened: generated rows are never VG-MedGen's training data
    run_dir = storage / name
    if fresh and run_dir.exists():
        aside = storage / f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.rename(aside)
        log.info("--fresh: moved the earlier run to %s", aside)
        if tracker is not None:
            tracker.retire(name, aside.name)  # the new run gets its own MLflow run and metric history
    if stage == "visual" and read_done(run_dir) is None:
        check_visual_masks(cfg)  # before any run is opened: too few masks is a config error
    export_dir = run_dir / "export" / PARTS[stage]
    done = read_done(run_dir)
    if done is not None:
        print(
            f"[{stage}] finished earlier as run {name}; nothing to train (use --fresh to retrain)", flush=True
        )
        found = tracker.find_run(name) if tracker is not None else None  # left as it ended
        return StageResult(stage, name, export_dir, False, done.get("metrics", {}), found)
    tags = {"stage": stage, "config_hash": name.rsplit("-", 1)[1]}
    # The stage's run ends with the stage: FINISHED, KILLED (interrupted) or FAILED; a resumed stage reopens it.
    with open_run(tracker, key=name, name=stage, parent_id=parent_run_id, tags=tags) as mlflow_run:
        metrics = _train_stage(
            cfg, stage, inputs, name, run_dir, export_dir, tracker, mlflow_run, objective, callbacks
        )
    return StageResult(stage, name, export_dir, True, metrics, mlflow_run)


def _train_stage(
    cfg: ExperimentConfig,
    stage: str,
    inputs: dict[str, Path],
    name: str,
    run_dir: Path,
    export_dir: Path,
    tracker: Any,
    mlflow_run: str | None,
    objective: Any = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, float]:
    """Fit the stage's TorchTrainer (resuming from its latest checkpoint), mark it done, log its export."""
    from vgmedgen.platform.training.trainer import build_trainer

    stage_cfg = getattr(cfg.train, stage)
    storage = run_dir.parent
    if tracker is not None:
        tracker.log_params(mlflow_run, {"stage": stage, **stage_identity(cfg, stage, inputs)})
    spec = {
        "experiment": cfg.model_dump(mode="json"),
        "stage": stage,
        "inputs": {k: str(v) for k, v in inputs.items()},
        "export_dir": str(export_dir),
        "fault_marker": str(run_dir / "fault_injected"),
        "run_dir": str(run_dir),
        "tracking": {"uri": tracker.uri, "run_id": mlflow_run} if tracker is not None else None,
        "objective": objective.to_json() if objective is not None else None,
    }
    score_name, score_order = STAGE_SCORES[stage]
    score_key = f"{stage}/val_{score_name}"
    sc = cfg.train.scaling
    datasets = None
    if cfg.train.ingest == "ray_data":
        import ray

        from vgmedgen.platform.training.data import decode_record_batch

        free = ray.cluster_resources().get("CPU", 0) - sc.num_workers * sc.cpus_per_worker
        if free < 0.5:
            raise ConfigError(
                f"train.ingest=ray_data needs CPUs left for Ray Data besides the {sc.num_workers} training workers "
                f"x {sc.cpus_per_worker} CPUs, but the cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs: "
                "lower train.scaling.num_workers or cpus_per_worker, or use train.ingest=memory"
            )

        datasets = {
            "train": ray.data.read_parquet(str(cfg.records_dir), file_extensions=["parquet"])
            .filter(expr="split == 'train'")
            .map_batches(decode_record_batch, batch_size=256, num_cpus=0.5)
        }
    trainer = build_trainer(
        stage_worker,
        {"spec": json.dumps(spec)},
        sc,
        name=name,
        storage=storage,
        score_attribute=score_key,
        score_order=score_order,
        num_to_keep=stage_cfg.num_to_keep,  # the best by validation score, plus always the latest
        datasets=datasets,
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if not (export_dir / "manifest.json").is_file():
        raise RuntimeError(f"stage {stage} finished without writing its export to {export_dir}")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    best = {}
    if result.best_checkpoints:
        best_ckpt, best_metrics = result.get_best_checkpoint(score_key, score_order), None
        for ckpt, m in result.best_checkpoints:
            if best_ckpt is not None and ckpt.path == best_ckpt.path:
                best_metrics = m
        if best_ckpt is not None and best_metrics is not None:
            best = {
                "path": best_ckpt.path,
                "step": best_metrics.get("step"),
                score_key: best_metrics.get(score_key),
            }
    run_dir.mkdir(parents=True, exist_ok=True)
    kept = _remove_orphaned_checkpoints(run_dir, result)
    if tracker is not None:  # before the done-marker: a stage found done has its export in its run
        tracker.log_artifacts(mlflow_run, export_dir, f"export/{PARTS[stage]}")
        if best:
            tracker.client.set_tag(
                mlflow_run,
                "best_checkpoint",
                f"{best['path']} (step {best['step']}, {score_key}={best[score_key]})",
            )
    write_done(
        run_dir,
        {
            "metrics": metrics,
            "best_checkpoint": best,
            "checkpoints": kept,
            "seconds": time.perf_counter() - t0,
        },
    )
    return metrics


def _remove_orphaned_checkpoints(run_dir: Path, result: Any) -> list[str]:
    """Delete checkpoint directories Ray Train never registered (a report lost with a killed worker: the
    loop resumed from it, and Ray neither lists nor deletes it)."""
    import shutil

    kept = {Path(c.path).resolve() for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        kept.add(Path(result.checkpoint.path).resolve())
    for d in run_dir.glob("checkpoint_*"):
        if d.is_dir() and d.resolve() not in kept:
            log.info("removing checkpoint %s, which Ray Train never registered", d)
            shutil.rmtree(d, ignore_errors=True)
    return sorted(str(p) for p in kept)


def stage_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (in-process when ``num_workers=0``)."""
    from vgmedgen.platform.training.loop import TrainContext
    from vgmedgen.platform.training.trainer import worker_session

    spec = json.loads(config["spec"])
    cfg = ExperimentConfig.model_validate(spec["experiment"])
    sc = cfg.train.scaling
    with worker_session(sc.use_gpu, sc.threads, cfg.seed) as device:  # threads: part of the stage's identity
        _run_worker(spec, cfg, TrainContext(Path(spec["run_dir"])), device)


def _run_worker(spec: dict[str, Any], cfg: ExperimentConfig, ctx: Any, device: Any) -> None:
    from vgmedgen.platform.tracking import MetricsSink
    from vgmedgen.platform.training.loop import train_loop
    from vgmedgen.platform.training.stages import build_task

    stage = spec["stage"]
    task = build_task(
        stage, cfg, {k: Path(v) for k, v in spec["inputs"].items()}, device, ctx.rank, ctx.world
    )
    if spec.get("objective") and stage == "dit" and ctx.rank == 0:  # rank 0 validates
        from vgmedgen.platform.tuning.objective import ObjectiveSpec, TrialObjective

        task.objective = TrialObjective(ObjectiveSpec.from_json(spec["objective"]), cfg, device)
    sink = None
    if spec["tracking"] and ctx.rank == 0:
        sink = MetricsSink(spec["tracking"]["uri"], spec["tracking"]["run_id"])
    export_dir = Path(spec["export_dir"])
    source = None
    if cfg.train.ingest == "ray_data":
        import ray.train  # RAY

        from vgmedgen.platform.training.data import StreamBatches

        stage_cfg = getattr(cfg.train, stage)
        # batch_size is global: each rank streams its share of every micro-batch.
        share = stage_cfg.batch_size // (stage_cfg.grad_accum * ctx.world)
        source = StreamBatches(ray.train.get_dataset_shard("train"), share, cfg.seed)  # RAY
    train_loop(
        task,
        getattr(cfg.train, stage),
        cfg.seed,
        ctx,
        device,
        metrics_sink=sink,
        export_dir=export_dir,
        fault_marker=Path(spec["fault_marker"]),
        batch_source=source,
    )
