"""The demo: train an experiment, then measure the swap-grid adherence of its model version.

After training (a Ray cluster, ``train_experiment``) the demo

1. trains or reuses the *ruler*, the lesion segmentor every model is measured with
   (:func:`~vgmedgen.platform.evaluation.adherence.train_ruler`, cached under
   ``<output_root>/evaluation/<records>/ruler-<hash>``: the hash is of the ruler's spec and the
   records, never of the model);
2. calibrates the reference colours on the real train records and scores the ruler on the real
   validation records (its ceiling);
3. samples the swap grid of ``cfg.adherence`` from the model version and measures every image with
   the ruler (the headline) and with the model's own pseudo-mask (beside, labelled);
4. adds the headline figures to the version's model card (``MODEL_CARD.md``) and logs the metrics, the
   grids and the updated card into the train job's MLflow parent run.

Everything it reads is the experiment config: ``cfg.adherence`` (``adherence.seeds_per_cell=4`` on
the command line, ``adherence:`` in YAML) is out of every training identity, so changing it
re-measures a trained model without retraining it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.vgmedgen import MODEL_CARD
from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.evaluation.adherence import (
    AdherenceResult,
    load_calibration,
    measure_adherence,
    ruler_accuracy,
    train_ruler,
    write_payload,
)
from vgmedgen.platform.modelcard import record_measurements

if TYPE_CHECKING:
    from vgmedgen.platform.training.driver import TrainSummary

__all__ = ["DemoOutcome", "demo_output_dir", "demo_report", "run_demo"]


@dataclass
class DemoOutcome:
    """What the demo did: the training summary, the adherence result, where it wrote, and its timings."""

    summary: TrainSummary
    result: AdherenceResult
    out_dir: Path
    seconds: dict[str, float]
    seeds_per_cell: int


def _log_to_mlflow(uri: str, run_id: str, result: AdherenceResult, out_dir: Path, card: Path) -> None:
    """Adherence metrics and the grids into the train job's MLflow parent run, and the updated model card
    beside the registered version's files."""
    from vgmedgen.platform.tracking import MetricsSink

    sink = MetricsSink(uri, run_id)
    sink([(0, result.metrics())])
    paths = [p for p in (result.grid_path, result.samples_path, out_dir / "adherence.json") if p is not None]
    sink.artifacts([p for p in paths if p.is_file()], artifact_path="adherence")
    sink.artifacts([card], artifact_path="model_version")


def _record_on_card(cfg: ExperimentConfig, version_dir: Path, result: AdherenceResult, out_dir: Path) -> Path:
    """The headline adherence figures (per factor, pass flags, the pseudo-mask's and the ruler's ceiling;
    not the per-row and per-column ones) on the version's model card."""
    headline = result.headline_metrics()
    adh = cfg.adherence
    ruler = result.ruler_run.parent.name if result.ruler_run is not None else result.instrument
    source = (
        f"jobs/demo.py: the swap grid ({len(result.rows)} anatomy x {len(result.columns)} style prompts, "
        f"{adh.seeds_per_cell} seeds per cell) read by `{ruler}`; thresholds "
        + ", ".join(f"{k} {v:.2f}" for k, v in result.thresholds.items())
    )
    files = {
        "swap grid": result.grid_path,
        "samples": result.samples_path,
        "measurements": out_dir / "adherence.json",
    }
    return record_measurements(
        version_dir,
        "adherence",
        headline,
        dataset=cfg.data.dataset,
        records=cfg.data.records_name,
        source=source,
        files={k: str(p) for k, p in files.items() if p is not None},
    )


def demo_output_dir(cfg: ExperimentConfig, version: str) -> Path:
    """Where the demo writes one measurement of model version ``version``: one folder per first seed of the
    swap grid, so measuring again on other seeds (``adherence.seed=1000``) keeps the earlier images."""
    return cfg.root / "demo" / cfg.name / version / f"seed-{cfg.adherence.seed}"


def run_demo(cfg: ExperimentConfig, *, address: str | None = None, fresh: bool = False) -> DemoOutcome:
    """Train ``cfg`` (or reuse its finished stages), then measure its swap-grid adherence.

    Args:
        cfg: the experiment; its ``adherence`` section sets the grid, thresholds and ruler.
        address: Ray cluster address for training (None: ``RAY_ADDRESS`` or a local instance).
        fresh: retrain stages that finished earlier (the ruler is reused: it does not depend on them).

    Raises:
        ConfigError: the data is not SynthDerm (the swap grid's prompts and factors are SynthDerm's).
    """
    import torch

    from vgmedgen.model.vgmedgen import VGMedGen
    from vgmedgen.platform.training.driver import train_experiment

    if cfg.data.dataset != "synthderm":
        raise ConfigError(
            f"the demo's adherence check samples SynthDerm prompts and reads SynthDerm factors, but data.dataset "
            f"is '{cfg.data.dataset}'; use data.dataset=synthderm (configs/demo.yaml), or jobs/evaluate.py for "
            "other datasets"
        )
    adh = cfg.adherence
    t0 = time.perf_counter()
    summary = train_experiment(cfg, address=address, fresh=fresh)
    t_train = time.perf_counter() - t0

    t1 = time.perf_counter()
    storage = cfg.evaluation_storage
    ruler = train_ruler(cfg.records_dir, storage, cfg.data.resolution, adh.ruler)
    import ray

    if ray.is_initialized():
        ray.shutdown()  # free the CPUs for sampling; the cluster was only for training
    colours = load_calibration(cfg.records_dir, adh)
    on_real = ruler_accuracy(ruler, cfg.records_dir, adh, colours)
    t_ruler = time.perf_counter() - t1

    t2 = time.perf_counter()
    model = VGMedGen.from_pretrained(summary.model_version)
    out_dir = demo_output_dir(cfg, summary.model_version.name)
    with torch.no_grad():
        result = measure_adherence(model, adh, colours, ruler, out_dir=out_dir, ruler_on_real=on_real)
    if result.mosaic is not None:  # the same index on real records: what "no visible blocks" measures
        from vgmedgen.platform.evaluation.mosaic import mosaic_index
        from vgmedgen.platform.training.data import RecordArrays

        real = RecordArrays.load_validation(cfg.records_dir, limit=256)
        result.mosaic["real"] = mosaic_index(real.images.float(), int(result.mosaic["block"]))
        write_payload(result, out_dir)
    t_adh = time.perf_counter() - t2
    card = _record_on_card(cfg, summary.model_version, result, out_dir)
    if summary.mlflow_run_id and summary.tracking_uri:
        _log_to_mlflow(summary.tracking_uri, summary.mlflow_run_id, result, out_dir, card)
    seconds = {"train": t_train, "ruler": t_ruler, "adherence": t_adh, "total": time.perf_counter() - t0}
    return DemoOutcome(summary, result, out_dir, seconds, adh.seeds_per_cell)


def _banner(result: AdherenceResult) -> str:
    if result.all_passed:
        return "ADHERENCE: PASS (every factor reached its threshold)"
    failed = ", ".join(k for k, ok in result.passed.items() if not ok)
    rule = "!" * 78
    return (
        f"{rule}\n!! ADHERENCE: FAIL for {failed}: the model does not yet follow those prompts well enough.\n"
        f"!! The pipeline itself worked; train longer (see configs/demo-long.yaml) or tune the demo preset.\n{rule}"
    )


def demo_report(outcome: DemoOutcome) -> str:
    """The demo's printed report: timings, where everything is, the adherence tables and the verdict."""
    s, r, t = outcome.summary, outcome.result, outcome.seconds
    trained = [st.stage for st in s.stages if st.trained]
    ruler = r.ruler_run.parent.name if r.ruler_run is not None else "-"
    lines = [
        "=" * 78,
        f"stages trained: {', '.join(trained) or 'none (all finished earlier)'}; training {t['train']:.0f} s, "
        f"ruler + calibration {t['ruler']:.0f} s, swap grid + adherence {t['adherence']:.0f} s",
        f"model version:  {s.model_version}",
        f"swap grid:      {r.grid_path}   (rows: anatomy prompts, columns: style prompts)",
        f"sample grid:    {r.samples_path}   ({outcome.seeds_per_cell} seeds per cell, side by side)",
        f"measurements:   {outcome.out_dir / 'adherence.json'}",
        f"model card:     {s.model_version / MODEL_CARD}   (adherence added)",
        f"ruler:          {ruler}   (a lesion segmentor trained once on the real train records, the same for every model)",
        "",
        f"Adherence of the swap grid in SynthDerm's words ({r.vocabulary}): size and position by the {r.instrument}'s mask,",
        "colour by the nearest calibrated pigment colour inside it; the model's own stage-1 pseudo-mask beside (mask):",
        "",
        r.table(),
        "",
        _banner(r),
    ]
    if s.registered:
        lines.append(f"\nregistered:     {s.registered}")
    if s.tracking_uri:
        lines.append(f"MLflow UI:      mlflow ui --backend-store-uri {s.tracking_uri}")
    lines.append(f"total:          {t['total']:.0f} s")
    return "\n".join(lines)
