"""The demo: prepare SynthDerm, train visual -> align -> dit on a local Ray cluster, then measure adherence.

    python jobs/demo.py --config configs/demo.yaml [dotted overrides ...]
    python jobs/demo.py --config configs/demo.yaml adherence.seeds_per_cell=4 adherence.size_threshold=0.7
    make demo        (the same, with configs/demo.yaml)

After training it samples the swap grid of the config's ``adherence`` section (rows: anatomy prompts
spanning lesion size and position; columns: style prompts spanning pigment and skin tone) from the
model version and measures every image twice: with the ruler, a lesion segmentor trained once on the
real records and reused for every model (the headline), and with the model's own stage-1 pseudo-mask
(beside it). It prints the agreement per factor against its threshold, where the grids are, the model
version and the command that opens the MLflow UI. ``adherence.*`` overrides are ordinary experiment
overrides (:class:`vgmedgen.platform.evaluation.config.AdherenceConfig`); they change no training run.

The exit status is 0 when the pipeline worked, even when adherence misses a threshold (that is
reported loudly): the demo shows what the trained model does, it does not hide it.
"""

from __future__ import annotations

from vgmedgen.platform.cli import exit_job, job_parser, load_from_args, run_job
from vgmedgen.platform.evaluation.demo import demo_report, run_demo


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__).parse_args(argv)
    cfg = load_from_args(args)
    outcome = run_demo(cfg, address=args.address, fresh=args.fresh)
    print("\n" + demo_report(outcome))
    return 0


if __name__ == "__main__":
    exit_job(run_job(main))
