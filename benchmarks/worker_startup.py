"""Start-up imports of a Ray worker: what the visual and align stages' workers (and every process that only
reads an experiment config) import, against what the dit stage's workers import.

    python benchmarks/worker_startup.py [--repeats 3]

Each figure is the median wall time of a fresh `python -c "import ..."` over --repeats runs, taken in turns in
this one run. The baseline is the dit worker's set (the stage tasks plus the generator, with diffusers): before
the generator's and the model's configs moved to their own modules, every stage's workers and every reader of a
config paid it. Prints each set's seconds and its ratio to the baseline (target: the visual/align set at most
0.5x). Measured on 2 CPUs: config 3.3-3.5 s, visual/align stage 3.5-3.8 s, dit stage 10.6 s (ratio about 0.35);
a three-stage tiny training (configs/tiny.yaml, 4 steps a stage, 2 workers) went from 125 s to 108 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

SETS = {
    "dit stage worker (baseline)": "vgmedgen.platform.training.stages, vgmedgen.model.generator",
    "experiment config": "vgmedgen.platform.config",
    "visual/align stage worker": "vgmedgen.platform.training.stages, vgmedgen.platform.training.loop",
}


def seconds(modules: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in SETS}
    for _ in range(args.repeats):
        for name, modules in SETS.items():  # in turns, so a slow spell of the host hits every set
            times[name].append(seconds(modules))
    base = statistics.median(times["dit stage worker (baseline)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:32s} {median:6.2f} s  ratio {median / base:.2f}  ({', '.join(f'{v:.2f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
