"""List, and with --delete delete, the experiment's stage runs that nothing refers to (a dry run by default).

    python jobs/clean.py --config configs/demo.yaml                  # list: run, kind, size, age, why
    python jobs/clean.py --config configs/demo.yaml --delete         # delete those directories and MLflow runs
    python jobs/clean.py --config configs/demo.yaml output_root=/shared/vgmedgen --min-age-hours 72

A run under <output_root>/runs/ is kept while a registered model version (its model card, its MLflow stage
runs) or an unfinished sweep (<output_root>/sweeps/*/sweep.json) refers to it, while its MLflow run or its
job's is RUNNING, and while anything in it changed within --min-age-hours (default 24). Everything else of
this experiment is listed with the reason, including runs moved aside by --fresh (<run>.old-<time>).
--delete removes those directories and soft-deletes their MLflow stage runs; the `mlflow gc` command it
prints removes them for good. See docs/clean.md. Runs here, without Ray: --address and --fresh are unused.
"""

from __future__ import annotations

from collections.abc import Sequence

from vgmedgen.platform.clean import (
    DEFAULT_MIN_AGE_HOURS,
    apply_clean,
    format_plan,
    format_report,
    open_tracker,
    plan_clean,
)
from vgmedgen.platform.cli import exit_job, job_parser, load_from_args, run_job


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument(
        "--delete", action="store_true", help="delete the unreferenced runs (default: only list them)"
    )
    parser.add_argument(
        "--min-age-hours",
        type=float,
        default=DEFAULT_MIN_AGE_HOURS,
        help=f"keep runs changed within this many hours: a job may be writing them (default {DEFAULT_MIN_AGE_HOURS:g})",
    )
    args = parser.parse_args(argv)
    cfg = load_from_args(args)
    tracker = open_tracker(cfg)
    plan = plan_clean(cfg, tracker, args.min_age_hours)
    print(format_plan(plan, delete=args.delete))
    if not args.delete or not plan.candidates:
        return 0
    report = apply_clean(plan, tracker)
    print("\n" + format_report(report))
    return 1 if report.failed else 0


if __name__ == "__main__":
    exit_job(run_job(main))
