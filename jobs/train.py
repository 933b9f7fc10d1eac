"""Train VG-MedGen: prepare the records if needed, then the stages visual -> align -> dit on Ray Train.

    python jobs/train.py --config configs/demo.yaml [train.dit.steps=500 ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml output_root=/shared/vgmedgen

Each stage resumes from its latest checkpoint when re-submitted; a finished stage is not retrained
(--fresh retrains). Prints the model version directory, its registry name and the MLflow UI command.
"""

from __future__ import annotations

from vgmedgen.platform.cli import exit_job, job_parser, load_from_args, run_job
from vgmedgen.platform.training.driver import train_experiment


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__).parse_args(argv)
    cfg = load_from_args(args)
    summary = train_experiment(cfg, address=args.address, fresh=args.fresh)
    trained = [r.stage for r in summary.stages if r.trained]
    print(
        f"\nstages trained: {', '.join(trained) or 'none (all finished earlier)'} in {summary.seconds:.0f} s"
    )
    print(f"model version: {summary.model_version}")
    if summary.registered:
        print(f"registered:    {summary.registered}")
        print(f"MLflow UI:     mlflow ui --backend-store-uri {summary.tracking_uri}")
    return 0


if __name__ == "__main__":
    exit_job(run_job(main))
