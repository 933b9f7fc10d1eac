"""A new MLflow sqlite store: built by MLflow (every schema migration since its first release) against copied from
the blank store kept per MLflow version (what :class:`vgmedgen.platform.tracking.Tracker` does), in one run.

    python benchmarks/mlflow_store.py [--repeats 5]

Each repeat opens a Tracker on a new output root each way, in turns: once with no usable cache (MLflow builds the
store, as before the blank store existed) and once with this run's own cache; the blank store itself is made
once, before the timed runs, as the first job on a machine makes it. Prints the median seconds of each and the
ratio copy / MLflow (target: at most 0.1). Measured on 2 CPU cores, idle: MLflow 1.6 s (1.1-1.7 s), the copy
0.05 s, ratio 0.030; beside a running test suite: MLflow 3.1-5.0 s, the copy 0.08-0.11 s, ratio 0.016-0.036.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def made(root: Path, cache: Path) -> float:
    """Seconds for a tracker to open a new store under ``root``, with ``cache`` as XDG_CACHE_HOME."""
    from vgmedgen.platform.tracking import Tracker, TrackingConfig

    os.environ["XDG_CACHE_HOME"] = str(cache)
    t0 = time.perf_counter()
    Tracker(TrackingConfig(), root, "bench")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        cache, unusable = base / "cache", base / "not-a-folder"
        unusable.write_text("")  # as XDG_CACHE_HOME: no blank store can be kept, so MLflow builds each store
        from vgmedgen.platform.tracking import blank_store_path

        made(base / "warm-up", unusable)  # imports MLflow, outside the timings
        first = made(base / "first", cache)  # makes the blank store, as a machine's first job does
        if not blank_store_path().is_file():
            raise SystemExit(f"the blank store was not made at {blank_store_path()}")
        mlflow_s, copy_s = [], []
        for i in range(args.repeats):  # in turns, so a slow spell of the host hits both
            mlflow_s.append(made(base / f"mlflow-{i}", unusable))
            copy_s.append(made(base / f"copy-{i}", cache))
    a, b = statistics.median(mlflow_s), statistics.median(copy_s)
    print(f"first store on the machine (blank made, then copied): {first:.2f} s")
    print(f"made by MLflow      {a:6.3f} s  ({', '.join(f'{v:.3f}' for v in mlflow_s)})")
    print(f"copied blank store  {b:6.3f} s  ({', '.join(f'{v:.3f}' for v in copy_s)})")
    print(f"ratio copy / MLflow {b / a:.3f}  (target <= 0.1)")


if __name__ == "__main__":
    main()
