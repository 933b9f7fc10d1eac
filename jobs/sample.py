"""Sample images and pseudo-masks from a VG-MedGen model version, in this process (no Ray).

    python jobs/sample.py --model ~/vgmedgen/models/demo/<version> \\
        --anatomy "a small round lesion in the upper left" --style "dark brown, dermoscopy" --n 4 --seed 0
    python jobs/sample.py --model vgmedgen-demo@current --config configs/demo.yaml --caption "..." --out /tmp/s
    python jobs/sample.py --model <dir> --reference real.png [--style "..."]   # anatomy of a real image

--model is a model version directory (what the train job prints) or a registry reference
``<name>@<alias>``, resolved in the MLflow store of the experiment config (``--config``, dotted
overrides such as ``output_root=/data/vgmedgen`` and ``VGMEDGEN_OUTPUT_ROOT`` as for every job).
Conditions: --anatomy with --style, or --caption, or --reference (style from the image, or from
--style). Steps and guidance default to the model version's sampler config.

Writes ``<i>.png``, ``<i>_mask.png`` (the stage-1 pseudo-mask, 0/255) and ``samples.json`` (each
image's prompts, seed and model version; image i has seed ``seed + i``) to --out, by default
``<output_root>/samples/<model version hash>-seed<seed>``, and prints where. --address and --fresh
are accepted like every job's but unused: sampling runs here, without a cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.cli import job_parser, load_from_args, run_job
from vgmedgen.platform.config import ExperimentConfig


def _parser() -> argparse.ArgumentParser:
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
    return parser


def resolve_model(ref: str, cfg: ExperimentConfig) -> Path:
    """A model version directory for ``ref``: an existing directory, or ``<name>@<alias>`` in the registry."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if "@" not in ref:
        raise FileNotFoundError(
            f"--model {ref}: no such model version directory, and not a registry reference '<name>@<alias>'"
        )
    if not cfg.tracking.enabled:
        raise ConfigError(
            f"--model {ref} is a registry reference, but tracking is disabled (tracking.enabled=false)"
        )
    from vgmedgen.platform.tracking import Tracker

    return Tracker(cfg.tracking, cfg.root, cfg.name).resolve(ref)


def read_reference(path_text: str) -> Any:
    """Open ``--reference`` as an RGB PIL image, with a clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path_text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--reference {path}: no such image file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ConfigError(
            f"--reference {path} is not a readable image ({exc}); give a PNG or JPEG file"
        ) from None


def model_version_id(directory: Path) -> str:
    """The sha256 of the version's manifest (which holds every file's hash): its content identity."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"--model {directory} is not a model version: {manifest} is missing")
    return hashlib.sha256(manifest.read_bytes()).hexdigest()


def _load_quietly(pipeline_cls: Any, model_dir: Path) -> Any:
    """Load the pipeline without transformers' per-tensor "Loading weights" bar (noise around errors)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return pipeline_cls.from_pretrained(model_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("n", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value}")
    cfg = load_from_args(args)
    from vgmedgen.model.pipeline import VGMedGenPipeline

    reference = read_reference(args.reference) if args.reference else None
    # Wrong prompt combinations fail here, before the model loads.
    VGMedGenPipeline.check_inputs(args.caption, args.anatomy, args.style, reference)
    model_dir = resolve_model(args.model, cfg)
    version = model_version_id(model_dir)

    pipe = _load_quietly(VGMedGenPipeline, model_dir)
    pipe.set_progress_bar_config(disable=args.quiet)
    out = pipe(
        anatomy_prompt=args.anatomy,
        style_prompt=args.style,
        prompt=args.caption,
        reference_image=reference,
        num_images_per_prompt=args.n,
        num_inference_steps=args.steps,
        guidance_anatomy=args.guidance_anatomy,
        guidance_style=args.guidance_style,
        seed=args.seed,
        output_type="pil",
    )

    out_dir = (
        Path(args.out).expanduser() if args.out else cfg.root / "samples" / f"{version[:12]}-seed{args.seed}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    sampler = pipe.model.config.sampler
    settings = {
        "num_steps": args.steps or sampler.num_steps,
        "guidance_anatomy": sampler.guidance_anatomy
        if args.guidance_anatomy is None
        else args.guidance_anatomy,
        "guidance_style": sampler.guidance_style if args.guidance_style is None else args.guidance_style,
    }
    prompts = {
        "anatomy_prompt": args.anatomy,
        "style_prompt": args.style,
        "caption": args.caption,
        "reference": str(Path(args.reference).expanduser().resolve()) if args.reference else None,
    }
    prompts = {k: v for k, v in prompts.items() if v is not None}
    samples = []
    for i, (image, mask, seed) in enumerate(zip(out.images, out.masks, out.seeds)):
        image.save(out_dir / f"{i}.png")
        mask.save(out_dir / f"{i}_mask.png")
        samples.append(
            {
                "image": f"{i}.png",
                "mask": f"{i}_mask.png",
                "seed": seed,
                **prompts,
                "model_version": version,
                **settings,
            }
        )
    index = {
        "model_version": {
            "ref": args.model,
            "directory": str(model_dir.resolve()),
            "manifest_sha256": version,
        },
        "sampler": settings,
        "samples": samples,
    }
    (out_dir / "samples.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {len(samples)} images and pseudo-masks to {out_dir}")
    print(f"index: {out_dir / 'samples.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
