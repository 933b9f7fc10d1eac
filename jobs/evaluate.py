"""Evaluate a model version (or a folder of generated images) against a dataset's real split.

    python jobs/evaluate.py --config configs/demo.yaml                       # this experiment's model @latest
    python jobs/evaluate.py --config configs/demo.yaml evaluate.model=/abs/models/demo/<version>
    python jobs/evaluate.py --config configs/ham10000.yaml evaluate.fidelity.fid=required \
        evaluate.fidelity.feature_extractor_weights_path=/abs/weights-inception-2015-12-05-6726825d.pth
    python jobs/evaluate.py --config configs/demo.yaml evaluate.downstream.enabled=true
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/demo.yaml output_root=/shared/vgmedgen

Writes report.json, report.md and PNG plots under <output_root>/evaluation/<experiment>/<version>/
and logs the numbers and the report to the model version's MLflow run. Domain FD/KD (HFD, KFD, ...)
are always computed; FID/KID need torch-fidelity's Inception weights file (evaluate.fidelity).
The domain extractor, the SynthDerm judges and the downstream nets train through the shared loop
and are reused on later runs while their data and settings are unchanged.
"""

from __future__ import annotations

from vgmedgen.platform.cli import exit_job, job_parser, load_from_args, run_job
from vgmedgen.platform.evaluation.driver import evaluate_experiment
from vgmedgen.platform.metrics.report import markdown_report


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__).parse_args(argv)
    cfg = load_from_args(args)
    outcome = evaluate_experiment(cfg, address=args.address)
    print("\n" + markdown_report(outcome.report))
    print(f"report:      {outcome.out_dir}")
    for kind, path in sorted(outcome.paths.items()):
        print(f"  {kind:<18} {path}")
    if outcome.mlflow_run_id:
        print(f"MLflow run:  {outcome.mlflow_run_id} (artifacts under evaluation/)")
    print(f"total:       {outcome.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    exit_job(run_job(main))
