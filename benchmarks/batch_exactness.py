"""How exact "the same request gives the same images, whatever else is in the batch" is.

    .venv/bin/python benchmarks/batch_exactness.py [--seeds 32] [--steps 4] [--sizes 2 4 8 16]

Samples ``--seeds`` single-image requests alone (batch of 1), then each again inside sampler batches of
each size in ``--sizes``, filled with other prompts, other seeds and other guidance (the serve batcher's
situation), and compares the 8-bit images. Prints, per batch size, the share of images that are
byte-identical, the share of pixels that differ and the largest difference in levels. The model is the
tests' tiny model version (random weights with noise, 16 px, CPU, one thread); the kernels' blocking,
not the weights, decides the rounding, so the figures speak for the code path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_model_version import ANATOMY, STYLE, make_text_encoder, make_trained_model  # noqa: E402

from vgmedgen.platform.generation.request import SampleRequest  # noqa: E402
from vgmedgen.platform.generation.sample import generate_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_trained_model(make_text_encoder(Path(tmp)), {"sampler": {"num_steps": args.steps}})
    wanted = [
        SampleRequest(anatomy_prompt=ANATOMY[0], style_prompt=STYLE[0], seed=s) for s in range(args.seeds)
    ]
    alone = [generate_samples(model, [r]).images_uint8()[0] for r in wanted]
    rng = np.random.default_rng(0)
    print(f"{'batch':>5} {'identical images':>17} {'pixels differing':>17} {'max levels':>10}")
    for size in args.sizes:
        same, differing, worst, total = 0, 0, 0, 0
        for r, ref in zip(wanted, alone):
            fillers = [
                SampleRequest(
                    anatomy_prompt=ANATOMY[int(rng.integers(len(ANATOMY)))],
                    style_prompt=STYLE[int(rng.integers(len(STYLE)))],
                    seed=int(rng.integers(10_000, 20_000)),
                    guidance_anatomy=float(rng.choice([1.0, 2.0, 4.5])),
                )
                for _ in range(size - 1)
            ]
            position = int(rng.integers(size))
            batch = [*fillers[:position], r, *fillers[position:]]
            got = generate_samples(model, batch, batch_size=size).images_uint8()[position]
            diff = np.abs(got.astype(int) - ref.astype(int))
            same += int(diff.max() == 0)
            differing += int((diff > 0).sum())
            total += diff.size
            worst = max(worst, int(diff.max()))
        print(f"{size:>5} {same / len(wanted):>16.0%} {differing / total:>16.4%} {worst:>10}")


if __name__ == "__main__":
    main()
