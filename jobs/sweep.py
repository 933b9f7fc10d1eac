"""Sweep hyperparameters of VG-MedGen with Ray Tune: staged trials ranked by KID, domain FD, FID, adherence or
the validation loss, weak trials stopped early by ASHA, shared upstream stages trained once.

    python jobs/sweep.py --config configs/sweeps/dit.yaml [trials=4 concurrent_trials=2 ...]
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweeps/dit.yaml

--config is a sweep file (configs/sweeps/*.yaml: a base experiment, overrides, the search space over dotted
config paths, the objective, the search algorithm, the scheduler and the trial budget); the dotted
overrides after it change the sweep file (e.g. trials=4, objective.metric=val_loss), except output_root=,
which sets the output root as for every job. The whole file is checked before any trial starts, including
whether the objective and the report can measure the base's dataset.

Running the same command again continues the sweep: finished trials are kept, unfinished ones resume from
their dit checkpoints, and their MLflow runs continue. --fresh moves the earlier sweep aside. The terminal
shows a live table of the trials; at the end the sweep writes trials.csv/trials.md, two plots and
best.yaml (the best trial's full config: `python jobs/train.py --config <that file>` reuses its runs) to
<output_root>/sweeps/<sweep>-<hash>/, and registers the best trial's model version as <model>@sweep-best
(trials never move `current`). With report.evaluate=true (configs/sweeps/ablation.yaml sets it) every
trial that trained to the end is evaluated and the groups of trials (e.g. variants over seeds) are
compared in comparison.md/.csv/.png; adding it to a finished sweep's command evaluates that sweep. Needs a Ray cluster with its dashboard on (the default of `ray start --head`
and of a local Ray): without it, a trial stopped early can leak its placement group and hang the next.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vgmedgen.platform.cli import exit_job, job_parser, run_job


def main(argv: Sequence[str] | None = None) -> int:
    from vgmedgen.model.configbase import ConfigError
    from vgmedgen.platform.tuning.config import load_sweep
    from vgmedgen.platform.tuning.runner import run_sweep

    parser = job_parser(__doc__)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.config:
        raise ConfigError("--config names the sweep file, e.g. --config configs/sweeps/dit.yaml")
    sweep = load_sweep(args.config, args.overrides)
    outcome = run_sweep(sweep, address=args.address, fresh=args.fresh)
    print(f"\nsweep {outcome.key}: {len(outcome.rows)} trials in {outcome.seconds:.0f} s")
    print(f"directory:  {outcome.directory}")
    if outcome.best is not None:
        print(f"best trial: {outcome.best.short} {outcome.best.values}")
        print(f"best.yaml:  {outcome.best_yaml}")
    else:
        print("no trial finished every dit step: no best trial (see trials.md)")
    if outcome.registered:
        print(f"registered: {outcome.registered}")
    if outcome.comparison:
        print(f"comparison: {outcome.comparison[1]}  (and {outcome.comparison[2].name})")
    return 0


if __name__ == "__main__":
    exit_job(run_job(main))
