"""How fast SynthDerm records are made in one process, and a contact sheet to look at them.

Usage:
    python benchmarks/synthderm_rate.py [--n 10000] [--size 64] [--seed 0] [--out DIR]

Prints records/s (wall and CPU time of this process), the projected time for 10,000 records,
the mean PNG sizes, and where the contact sheet of the first records was written. On our 2-core
CPU box 10,000 records at 64 px take about 20-25 s in one process (PNG encoding is about a
third of it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from vgmedgen.platform.datasets.synthderm import contact_sheet, synthderm_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="records to generate")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for the contact sheet (default: a temp dir)"
    )
    parser.add_argument("--sheet", type=int, default=64, help="records on the contact sheet")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be at least 1")

    synthderm_record(args.seed, 0, args.size)  # warm the per-size caches outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    first: list[dict] = []
    labels: Counter[str] = Counter()
    image_bytes = mask_bytes = 0
    for index in range(args.n):
        rec = synthderm_record(args.seed, index, args.size)
        labels[rec["label"]] += 1
        image_bytes += len(rec["image"])
        mask_bytes += len(rec["mask"])
        if index < args.sheet:
            first.append(rec)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    print(f"{args.n} records at {args.size}x{args.size}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    print(
        f"rate: {args.n / wall:.0f} records/s wall ({1e3 * wall / args.n:.2f} ms/record), {args.n / cpu:.0f} records/s CPU"
    )
    print(f"projected for 10,000 records: {1e4 * wall / args.n:.1f} s wall, {1e4 * cpu / args.n:.1f} s CPU")
    print(f"mean PNG bytes: image {image_bytes / args.n:.0f}, mask {mask_bytes / args.n:.0f}")
    print("classes: " + ", ".join(f"{k} {v}" for k, v in labels.most_common()))
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="synthderm-"))
    scale = max(1, 128 // args.size)  # small images are upscaled so they can be inspected
    sheet = contact_sheet(first, out / f"synthderm_{args.size}px.png", columns=8, scale=scale)
    print(f"contact sheet: {sheet}")


if __name__ == "__main__":
    main()
