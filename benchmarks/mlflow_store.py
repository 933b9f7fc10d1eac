"""A new MLflow sqlite store: built by MLflow (every schema migration since its first release) against copied from
the blank store kept per MLflow version (what :class:`vgmedgen.platform.tracking.Tracker` does), in one run.

    python benchmarks/mlflow_store.py [--repeats 5]

Each repeat makes one store each way, in turns, in a fresh temporary folder and cache; the blank store itself is
made once, before the timed runs, as the first job on a machine makes it. A store counts as made once it answers
an experiment lookup and has the tracker's experiment. Prints the median seconds of each and the ratio copy / MLflow
(target: at most 0.1). Measured on 2 CPU cores beside a running test suite: MLflow 3.1 s (1.3-8.0 s), the copy
0.11 s (0.06-0.13 s), ratio 0.036; the first store on the machine (the blank made, then copied) about 5-10 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def made_by_mlflow(root: Path) -> float:
    from mlflow.tracking import MlflowClient

    t0 = time.perf_counter()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    client.create_experiment("bench", artifact_location=(root / "mlartifacts").as_uri())
    return time.perf_counter() - t0


def made_by_the_tracker(root: Path) -> float:
    from vgmedgen.platform.tracking import Tracker, TrackingConfig

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
        os.environ["XDG_CACHE_HOME"] = str(base / "cache")  # a cache of this run's own
        import mlflow.tracking  # noqa: F401 -- imported before any timing

        from vgmedgen.platform.tracking import Tracker, TrackingConfig, blank_store_path

        t0 = time.perf_counter()
        Tracker(
            TrackingConfig(), base / "first", "bench"
        )  # makes the blank store, as a machine's first job does
        first = time.perf_counter() - t0
        assert blank_store_path().is_file(), "the blank store was not made"
        mlflow_s, copy_s = [], []
        for i in range(args.repeats):  # in turns, so a slow spell of the host hits both
            mlflow_s.append(made_by_mlflow(base / f"mlflow-{i}"))
            copy_s.append(made_by_the_tracker(base / f"tracker-{i}"))
    a, b = statistics.median(mlflow_s), statistics.median(copy_s)
    print(f"first store on the machine (blank made, then copied): {first:.2f} s")
    print(f"made by MLflow      {a:6.3f} s  ({', '.join(f'{v:.3f}' for v in mlflow_s)})")
    print(f"copied blank store  {b:6.3f} s  ({', '.join(f'{v:.3f}' for v in copy_s)})")
    print(f"ratio copy / MLflow {b / a:.3f}  (target <= 0.1)")


if __name__ == "__main__":
    main()
