"""Tune's overhead on a sweep, and the time stage reuse saves: N trials under Ray Tune against the same N dit
trainings run one after another without Tune, same resources, in one run.

    python benchmarks/sweep_overhead.py [--config configs/demo.yaml --steps 200 --trials 3 --workers 1]

1. The upstream stages (visual, align) are trained once, timed: that is what each trial after the first would
   spend again without stage reuse.
2. Baseline: the N dit trainings of the trials' configs (learning rates spread over a decade), one after
   another through the platform's stage runner (one TorchTrainer each), in output root A.
3. Tune: the same N trials through ``run_sweep`` (grid search, no scheduler, objective ``val_loss`` so both
   do the same work, no final re-scoring), in output root B, with the upstream runs copied there (the runs
   are found by content, so nothing upstream trains again).

Prints the wall times, Tune/baseline (target <= 1.10), the time of the Tuner alone against the baseline, and
the stage-reuse saving ((N - 1) x upstream time, against what N trials with their own upstream stages would
take). The output roots are temporary (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=200, help="dit steps per trial (default 200)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--set", nargs="*", default=[], metavar="path=value", help="more base overrides")
    parser.add_argument("--keep", action="store_true", help="keep the temporary output roots")
    args = parser.parse_args()

    from vgmedgen.platform.cluster import connect
    from vgmedgen.platform.prepare import prepare_records
    from vgmedgen.platform.runs import stage_run_name
    from vgmedgen.platform.training.driver import stage_inputs
    from vgmedgen.platform.training.runner import run_stage
    from vgmedgen.platform.tuning.config import load_sweep
    from vgmedgen.platform.tuning.runner import run_sweep
    from vgmedgen.platform.tuning.trial import train_upstream, trial_experiment

    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    roots = {"baseline": work / "baseline", "tune": work / "tune"}
    lrs = [round(1e-4 * 10 ** (i / max(args.trials - 1, 1)), 8) for i in range(args.trials)]
    sweeps = {}
    for label, root in roots.items():
        path = work / f"{label}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "base": str(Path(args.config).resolve()),
                    "overrides": [
                        f"output_root={root}",
                        f"train.dit.steps={args.steps}",
                        "tracking.enabled=false",
                        *args.set,
                    ],
                    "objective": {"metric": "val_loss", "final_top": 0},
                    "search": {"algorithm": "grid"},
                    "scheduler": {"kind": "none"},
                    "trials": args.trials,
                    "concurrent_trials": 1,
                    "resources": {"workers": args.workers, "cpus_per_worker": 1},
                    "report_every": args.report_every,
                    "space": {"train.dit.lr": {"grid": lrs}},
                }
            )
        )
        sweeps[label] = load_sweep(path)

    connect(None, include_dashboard=True)
    base = trial_experiment(sweeps["baseline"], {})
    prepare_records(base)
    t0 = time.perf_counter()
    parts, upstream = train_upstream(base, None, None, lock=False)
    t_upstream = time.perf_counter() - t0
    print(f"upstream stages ({', '.join(r.stage for r in upstream)}): {t_upstream:.1f} s", flush=True)

    t0 = time.perf_counter()
    for lr in lrs:
        cfg = trial_experiment(sweeps["baseline"], {"train.dit.lr": lr})
        run_stage(cfg, "dit", stage_inputs("dit", parts))
    t_base = time.perf_counter() - t0
    print(f"baseline, {args.trials} dit trainings one after another: {t_base:.1f} s", flush=True)

    tune_root = roots["tune"]
    (tune_root / "runs").mkdir(parents=True)
    for name in ("records", "encoders"):
        shutil.copytree(roots["baseline"] / name, tune_root / name, symlinks=True)
    for res in upstream:
        shutil.copytree(
            roots["baseline"] / "runs" / res.run_name, tune_root / "runs" / res.run_name, symlinks=True
        )
    tune_base = trial_experiment(sweeps["tune"], {})
    moved = train_upstream(tune_base, None, None, lock=False)[1]
    if any(r.trained for r in moved) or [r.run_name for r in moved] != [r.run_name for r in upstream]:
        raise SystemExit(
            "the copied upstream runs were not found finished in the Tune root; the comparison is off"
        )
    if stage_run_name(tune_base, "visual", {}) != upstream[0].run_name:
        raise SystemExit("the two roots name the visual run differently")
    t0 = time.perf_counter()
    outcome = run_sweep(sweeps["tune"])
    t_tune = time.perf_counter() - t0
    done = sum(r.state == "DONE" for r in outcome.rows)
    print(f"tune, {args.trials} trials ({done} done): {t_tune:.1f} s", flush=True)

    without_reuse = t_base + args.trials * t_upstream
    print("\n--- sweep overhead ---")
    print(f"config {args.config}, dit steps {args.steps}, trials {args.trials}, workers {args.workers}")
    print(f"baseline (dit trainings in a row): {t_base:8.1f} s")
    print(
        f"Tune (run_sweep, whole job):       {t_tune:8.1f} s   ratio {t_tune / t_base:.3f} (target <= 1.10)"
    )
    print(
        f"stage reuse: upstream {t_upstream:.1f} s once instead of {args.trials} times saves "
        f"{(args.trials - 1) * t_upstream:.1f} s, {100 * (args.trials - 1) * t_upstream / without_reuse:.0f} % of "
        f"the {without_reuse:.1f} s the trials would take with their own upstream stages"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
