"""Prepare a dataset into canonical Parquet records.

    python jobs/prepare.py --config configs/synthderm.yaml [data.resolution=32 ...]
    ray job submit --working-dir . -- python jobs/prepare.py --config configs/ham10000.yaml data.root=/data/HAM10000

Writes <output_root>/records/<name>/ (part-*.parquet + _manifest.json) and prints the counts per split
and class, and how many records have a lesion mask (with a warning and the fix when some have none;
data.mask_source=auto segments those images automatically). Re-running with the same data config
reuses the records; --fresh rebuilds them.
"""

from __future__ import annotations

from vgmedgen.platform.cli import exit_job, job_parser, load_from_args, run_job
from vgmedgen.platform.prepare import prepare_records


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__).parse_args(argv)
    cfg = load_from_args(args)
    summary = prepare_records(cfg, address=args.address, fresh=args.fresh)
    state = "reused (same data config)" if summary.reused else f"written in {summary.seconds:.1f} s"
    print(f"\n{summary.total} {summary.dataset} records {state}: {summary.records_dir}")
    print(summary.table())
    print(summary.mask_line())
    if report := summary.mask_report():
        print(f"WARNING: {report}")
    if summary.skipped:
        print(f"{len(summary.skipped)} unreadable input(s) skipped; see _manifest.json for the list")
    return 0


if __name__ == "__main__":
    exit_job(run_job(main))
