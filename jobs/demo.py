"""The demo: prepare SynthDerm, train visual -> align -> dit on a local Ray cluster, then measure adherence.

    python jobs/demo.py --config configs/demo.yaml [dotted overrides ...] [adherence.seeds_per_cell=4 ...]
    make demo        (the same, with configs/demo.yaml)

After training it loads the model version, samples the swap grid (rows: anatomy prompts spanning
lesion size and position; columns: style prompts spanning pigment and skin tone), measures every
image (size and position from the stage-1 pseudo-mask, colour from the mean lesion RGB) and
prints the agreement per factor against its threshold, where the grids are, the model version
and the command that opens the MLflow UI. Overrides starting with ``adherence.`` set fields of
:class:`vgmedgen.platform.evaluation.adherence.AdherenceConfig` (thresholds, grid, seeds).

The exit status is 0 when the pipeline worked, even when adherence misses a threshold (that is
reported loudly): the demo shows what the trained model does, it does not hide it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vgmedgen.model.configbase import build_config
from vgmedgen.platform.cli import job_parser, load_from_args, run_job
from vgmedgen.platform.config import apply_overrides
from vgmedgen.platform.evaluation.adherence import (
    AdherenceConfig,
    AdherenceResult,
    load_calibration,
    measure_adherence,
)
from vgmedgen.platform.training.driver import train_experiment

ADHERENCE_PREFIX = "adherence."


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(experiment overrides, adherence overrides without their prefix)."""
    experiment = [o for o in overrides if not o.startswith(ADHERENCE_PREFIX)]
    adherence = [o[len(ADHERENCE_PREFIX) :] for o in overrides if o.startswith(ADHERENCE_PREFIX)]
    return experiment, adherence


def _log_to_mlflow(uri: str, run_id: str, result: AdherenceResult) -> None:
    """Adherence metrics and the grids into the train job's MLflow parent run."""
    from vgmedgen.platform.tracking import MetricsSink

    sink = MetricsSink(uri, run_id)
    sink([(0, result.metrics())])
    paths = [p for p in (result.grid_path, result.samples_path) if p is not None]
    if result.grid_path is not None:
        paths.append(result.grid_path.parent / "adherence.json")
    sink.artifacts(paths, artifact_path="adherence")


def _banner(result: AdherenceResult) -> str:
    if result.all_passed:
        return "ADHERENCE: PASS (every factor reached its threshold)"
    failed = ", ".join(k for k, ok in result.passed.items() if not ok)
    rule = "!" * 78
    return (
        f"{rule}\n!! ADHERENCE: FAIL for {failed}: the model does not yet follow those prompts well enough.\n"
        f"!! The pipeline itself worked; train longer (see configs/demo-long.yaml) or tune the demo preset.\n{rule}"
    )


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = job_parser(__doc__)
    args = parser.parse_args(argv)
    args.overrides, adherence_overrides = _split_overrides(list(args.overrides))
    cfg = load_from_args(args)
    adherence = build_config(
        AdherenceConfig, apply_overrides({}, adherence_overrides), where="adherence overrides"
    )

    t0 = time.perf_counter()
    summary = train_experiment(cfg, address=args.address, fresh=args.fresh)
    t_train = time.perf_counter() - t0
    import ray

    if ray.is_initialized():
        ray.shutdown()  # free the CPUs for sampling; the cluster was only for training

    from vgmedgen.model.vgmedgen import VGMedGen

    t1 = time.perf_counter()
    model = VGMedGen.from_pretrained(summary.model_version)
    colours = load_calibration(cfg.records_dir, adherence)
    out_dir = cfg.root / "demo" / cfg.name / summary.model_version.name
    with torch.no_grad():
        result = measure_adherence(model, adherence, colours, out_dir=out_dir)
    t_adh = time.perf_counter() - t1
    if summary.mlflow_run_id and summary.tracking_uri:
        _log_to_mlflow(summary.tracking_uri, summary.mlflow_run_id, result)

    trained = [r.stage for r in summary.stages if r.trained]
    print("\n" + "=" * 78)
    print(
        f"stages trained: {', '.join(trained) or 'none (all finished earlier)'}; training {t_train:.0f} s, "
        f"swap grid + adherence {t_adh:.0f} s"
    )
    print(f"model version:  {summary.model_version}")
    print(f"swap grid:      {result.grid_path}   (rows: anatomy prompts, columns: style prompts)")
    print(
        f"sample grid:    {result.samples_path}   ({adherence.seeds_per_cell} seeds per cell, side by side)"
    )
    print(f"measurements:   {Path(out_dir) / 'adherence.json'}")
    print("\nAdherence of the swap grid (size and position by the stage-1 segmentor, colour by the nearest")
    print("calibrated pigment colour):\n")
    print(result.table())
    print()
    print(_banner(result))
    if summary.registered:
        print(f"\nregistered:     {summary.registered}")
    if summary.tracking_uri:
        print(f"MLflow UI:      mlflow ui --backend-store-uri {summary.tracking_uri}")
    print(f"total:          {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
