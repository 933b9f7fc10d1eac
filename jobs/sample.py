"""Sample images and pseudo-masks from a VG-MedGen model version, in this process (no Ray).

    python jobs/sample.py --model ~/vgmedgen/models/demo/<version> \\
        --anatomy "a small round lesion in the upper left" --style "dark brown, dermoscopy" --n 4 --seed 0
    python jobs/sample.py --model vgmedgen-demo@current --config configs/demo.yaml --caption "..." --out samples
    python jobs/sample.py --model <dir> --reference real.png [--style "..."]   # anatomy of a real image

--model is a model version directory (what the train job prints) or a registry reference
``<name>@<alias>``, resolved in the MLflow store of the experiment config (``--config``, dotted
overrides such as ``output_root=/data/vgmedgen`` and ``VGMEDGEN_OUTPUT_ROOT`` as for every job).
Conditions: --anatomy with --style, or --caption, or --reference (style from the image, or from
--style). Steps and guidance default to the model version's sampler config.

Writes ``<i>.png``, ``<i>_mask.png`` (the stage-1 pseudo-mask, 0/255) and ``samples.json`` (each
image's prompts, seed and model version; image i has seed ``seed + i``) to --out, by default
``<output_root>/samples/<model version hash>-seed<seed>``, and prints where. Every PNG records in
its text chunks that it is synthetic, with the same fields. --address and --fresh are accepted
like every job's but unused: sampling runs here, without a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

from vgmedgen.platform.cli import exit_job, job_parser, load_from_args, run_job
from vgmedgen.platform.generation.sample import SAMPLE_FLAGS, request_from_flags, sample_to_directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument(
        "--model", "-m", required=True, help="model version directory or registry reference <name>@<alias>"
    )
    parser.add_argument("--anatomy", help="anatomy prompt: lesion shape, size, position, border, count")
    parser.add_argument("--style", help="style prompt: colour, illumination, device, artefacts")
    parser.add_argument("--caption", help="one whole caption, split into anatomy and style by the model")
    parser.add_argument("--reference", help="a real image whose anatomy to reuse (PNG, JPEG, ...)")
    parser.add_argument("--n", type=int, default=4, help="number of images (default 4)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the first image; image i gets seed+i (default 0)"
    )
    parser.add_argument("--out", help="output directory (default <output_root>/samples/<version>-seed<seed>)")
    parser.add_argument("--steps", type=int, help="DPM-Solver++ steps (default: the model's sampler config)")
    parser.add_argument("--guidance-anatomy", type=float, help="anatomy guidance g_a (default: the model's)")
    parser.add_argument("--guidance-style", type=float, help="style guidance g_s (default: the model's)")
    args = parser.parse_args(argv)
    # A bad request or reference image fails before the model loads.
    request = request_from_flags({k: getattr(args, f[2:].replace("-", "_")) for k, f in SAMPLE_FLAGS.items()})
    cfg = load_from_args(args)
    out, index, count = sample_to_directory(cfg, args.model, request, args.out, progress=not args.quiet)
    print(f"wrote {count} images and pseudo-masks to {out}")
    print(f"index: {index}")
    return 0


if __name__ == "__main__":
    exit_job(run_job(main))
