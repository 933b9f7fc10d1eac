"""Generate a synthetic dataset from a model version on Ray Data: plan, sample, score, filter, write.

    python jobs/generate.py --config configs/demo.yaml "generate.policies=[{balance: {}}]"
    python jobs/generate.py --config configs/demo.yaml generate.model=/abs/models/demo/<version> \
        "generate.policies=[{multiply: 2}]" generate.export=imagefolder
    ray job submit --working-dir . -- python jobs/generate.py --config configs/demo.yaml output_root=/shared/vgmedgen

Writes <output_root>/generated/<experiment>/<plan>/: plan.parquet, table/ (one row per image, keyed by
sample_id, with scores, `accepted` and `reason`), records/ (the accepted rows as synthetic train
records), contact_sheets/, summary.json and, with export=imagefolder, imagefolder/ and masks/. The same
command run again resumes an interrupted run and writes nothing for a finished one.
"""

from __future__ import annotations

from vgmedgen.platform.cli import exit_job, job_parser, load_from_args, run_job
from vgmedgen.platform.generation.job import generate_experiment


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__).parse_args(argv)
    cfg = load_from_args(args)
    outcome = generate_experiment(cfg, address=args.address, fresh=args.fresh)
    s = outcome.summary
    print(f"\nplan:        {outcome.plan}")
    print(f"output:      {outcome.out_dir}")
    if s:
        print(f"accepted:    {s.get('accepted')} of {s.get('rows')}")
    print(f"written:     {outcome.written} images in {outcome.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    exit_job(run_job(main))
