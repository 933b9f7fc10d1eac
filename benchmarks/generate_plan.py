"""Generation-plan benchmark: building a 100,000-row plan against writing the same table, in one run.

It makes small SynthDerm train records in a temporary directory (8x8 images: the plan reads only their
ids, labels and texts) and times, on the same process and data:

* build_plan - our way: read the train split, draw records per class (``multiply``), derive seeds, sample
  ids and shards, build the Arrow table;
* write_table - the baseline: a plain ``pyarrow.parquet.write_table`` of that same table (the least any
  job that writes a plan pays);
* write_plan and read_plan - the checked writer and reader (every distinct request validated).

It prints the minimum over repeats of each (a shared machine is noisy) and each one's ratio to write_table.

Usage (about half a minute on 2 CPU cores with the defaults):
    .venv/bin/python benchmarks/generate_plan.py
    .venv/bin/python benchmarks/generate_plan.py --records 2000 --multiply 50 --repeats 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq

from vgmedgen.platform.config import ExperimentConfig
from vgmedgen.platform.datasets.synthderm import iter_synthderm
from vgmedgen.platform.generation.plan import build_plan, plan_key, read_plan, write_plan
from vgmedgen.platform.records import records_to_table

T = TypeVar("T")
MODEL_ID = "0123456789abcdef" * 4  # the shape of a model version id (a sha256)


def best_of(repeats: int, fn: Callable[[], T]) -> tuple[float, T]:
    """The minimum wall time over ``repeats`` calls of ``fn``, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1000, help="train records to draw prompts from")
    parser.add_argument("--multiply", type=float, default=100.0, help="K of the multiply policy")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each step (minimum shown)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = root / "records" / "bench"
        records.mkdir(parents=True)
        rows = [{**r, "split": "train"} for r in iter_synthderm(0, 0, args.records, 8)]
        pq.write_table(records_to_table(rows), records / "part-00000.parquet")
        cfg = ExperimentConfig.model_validate(
            {
                "output_root": str(root),
                "data": {"name": "bench"},
                "generate": {"policies": [{"multiply": args.multiply}], "seed": 7},
            }
        )

        t_build, plan = best_of(args.repeats, lambda: build_plan(cfg, MODEL_ID))
        t_write, _ = best_of(args.repeats, lambda: pq.write_table(plan, root / "plain.parquet"))
        t_checked, _ = best_of(args.repeats, lambda: write_plan(plan, root / "plan.parquet"))
        t_read, back = best_of(args.repeats, lambda: read_plan(root / "plan.parquet"))
        t_key, key = best_of(args.repeats, lambda: plan_key(plan))
        assert back.equals(plan), "read_plan did not give back the plan written"

    print(
        f"plan: {plan.num_rows:,} rows from {args.records:,} train records (multiply {args.multiply:g}), {key}"
    )
    print(f"  write_table (baseline)  {t_write:8.3f} s")
    for name, seconds in (
        ("build_plan", t_build),
        ("write_plan", t_checked),
        ("read_plan", t_read),
        ("plan_key", t_key),
    ):
        print(f"  {name:<22}  {seconds:8.3f} s   {seconds / t_write:6.1f} x write_table")


if __name__ == "__main__":
    main()
