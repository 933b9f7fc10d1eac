"""Sampling a loaded VG-MedGen for a list of sample requests, and writing what it made.

:func:`generate_samples` is the one place requests become images: requests that condition the
same way with the same sampler settings share sampler batches (an image depends only on its
condition, its seed and the model, not on its batch neighbours), each request's condition is
computed once and repeated over its images, and the result lists every image with its request
and seed. :func:`write_samples` writes images and pseudo-masks as PNGs that carry their
provenance (:mod:`vgmedgen.platform.images`) and a ``samples.json`` index.

Shape legend: N images, H/W image size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from vgmedgen.model.configbase import ConfigError
from vgmedgen.model.pipeline import reference_to_tensor
from vgmedgen.model.sampler import SamplerConfig
from vgmedgen.model.vgmedgen import VGMedGen
from vgmedgen.model.visual import MASK_THRESHOLD
from vgmedgen.platform.generation.request import SampleRequest, parse_request
from vgmedgen.platform.images import provenance_fields, save_png

if TYPE_CHECKING:
    from vgmedgen.platform.tracking import ModelRef

__all__ = [
    "SAMPLER_SETTINGS",
    "SAMPLE_FLAGS",
    "Samples",
    "generate_samples",
    "load_model",
    "load_references",
    "read_reference",
    "request_from_flags",
    "sample_to_directory",
    "write_samples",
]

# The sampler settings a request may set, recorded with every image.
SAMPLER_SETTINGS = ("num_steps", "guidance_anatomy", "guidance_style")


def read_reference(path: str | Path, *, name: str = "reference") -> PIL.Image.Image:
    """Open a reference image as RGB, with a clear error for a missing or unreadable file.

    Args:
        path: the image file (PNG, JPEG, ...).
        name: what to call it in messages (the sample job says ``--reference``).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{name} {file}: no such image file")
    try:
        with PIL.Image.open(file) as image:
            return image.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
        raise ConfigError(f"{name} {file} is not a readable image ({exc}); give a PNG or JPEG file") from None


def load_references(
    requests: Sequence[SampleRequest], *, name: str = "reference"
) -> dict[str, PIL.Image.Image]:
    """Every distinct reference image of ``requests``, read once (call before loading the model to
    fail fast on a bad path)."""
    paths = dict.fromkeys(r.reference for r in requests if r.reference is not None)
    return {p: read_reference(p, name=name) for p in paths}


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> VGMedGen:
    """Load a model version directory (content hashes checked) without transformers' per-tensor
    "Loading weights" bar, which is noise around errors."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return VGMedGen.from_pretrained(directory, device=device)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass
class Samples:
    """Images made for sample requests: request ``i``'s ``n`` images in seed order, request after request.

    Attributes:
        requests: the requests, in the order given.
        request_of: the index (in ``requests``) of each image's request.
        seeds: each image's seed.
        samplers: the sampler settings each request was sampled with (the model's, overridden by
            the request's).
        images: (N, 3, H, W) float32 RGB in [0, 1], on the CPU.
        masks: (N, 1, H, W) float32 stage-1 pseudo-mask probabilities in [0, 1].
    """

    requests: list[SampleRequest]
    request_of: list[int]
    seeds: list[int]
    samplers: list[SamplerConfig]
    images: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return len(self.seeds)

    def images_uint8(self) -> np.ndarray:
        """The images as (N, H, W, 3) uint8 (what a PNG holds)."""
        array = self.images.float().cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
        return (array * 255.0).round().clip(0, 255).astype(np.uint8)

    def masks_uint8(self) -> np.ndarray:
        """The pseudo-masks binarised at 0.5 as (N, H, W) uint8 0/255 (a segmentation label)."""
        probs = self.masks.float().cpu()[:, 0].numpy()  # (N, H, W)
        return np.where(probs > MASK_THRESHOLD, 255, 0).astype(np.uint8)

    def settings(self, i: int) -> dict[str, Any]:
        """Steps and guidance image ``i`` was sampled with."""
        sampler = self.samplers[self.request_of[i]]
        return {k: getattr(sampler, k) for k in SAMPLER_SETTINGS}

    def provenance(self, i: int, model_version: str | None, **extra: Any) -> dict[str, str]:
        """Provenance of image ``i`` for :func:`~vgmedgen.platform.images.png_bytes`: model version,
        seed, conditions and sampler settings (plus ``extra``)."""
        request = self.requests[self.request_of[i]]
        return provenance_fields(
            model_version=model_version,
            seed=self.seeds[i],
            **request.conditions(),
            **self.settings(i),
            **extra,
        )


def _conditions(
    model: VGMedGen, requests: Sequence[SampleRequest], references: Mapping[str, PIL.Image.Image]
) -> dict[str, torch.Tensor]:
    """Conditions of requests that condition the same way, one row per request."""
    mode = requests[0].mode
    if mode == "caption":
        return model.conditions_from_captions([r.caption or "" for r in requests])
    if mode == "prompts":
        return model.conditions_from_prompts(
            [r.anatomy_prompt or "" for r in requests], [r.style_prompt or "" for r in requests]
        )
    images = reference_to_tensor(
        [references[r.reference or ""] for r in requests], model.generator.image_size
    )  # (B, 3, S, S)
    style = [r.style_prompt or "" for r in requests] if requests[0].style_prompt is not None else None
    return model.conditions_from_reference(images, style=style)


def _row_guidance(
    chunk: Sequence[tuple[int, int]], samplers: Sequence[SamplerConfig]
) -> tuple[list[float], list[float]] | None:
    """Each image's ``(g_a, g_s)`` when the requests of ``chunk`` differ in guidance, else None (then the
    sampler config's two scalars apply, and guidance 1/1 keeps its single transformer pass)."""
    pairs = [(samplers[i].guidance_anatomy, samplers[i].guidance_style) for i, _ in chunk]
    if len(set(pairs)) == 1:
        return None
    return [a for a, _ in pairs], [s for _, s in pairs]


@torch.no_grad()
def generate_samples(
    model: VGMedGen,
    requests: Sequence[SampleRequest],
    *,
    references: Mapping[str, PIL.Image.Image] | None = None,
    base_sampler: SamplerConfig | None = None,
    batch_size: int = 64,
    use_ema: bool = True,
    progress: bool = False,
) -> Samples:
    """Generate the images and pseudo-masks of sample requests.

    Args:
        model: the loaded model (its EMA weights are sampled when present and ``use_ema``).
        requests: what to make; image ``k`` of a request gets seed ``seed + k``.
        references: reference images by path (:func:`load_references`); paths not in it are read.
        base_sampler: the sampler settings requests override (None: the model's sampler config).
        batch_size: most images per sampler batch.
        use_ema: sample from the EMA weights when the model has them.
        progress: show a progress bar.

    Returns:
        :class:`Samples`, in request order.
    """
    if not requests:
        raise ValueError("no sample requests given; pass at least one SampleRequest")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    requests = list(requests)
    base = base_sampler or model.config.sampler
    samplers = [r.sampler(base) for r in requests]
    refs = dict(references or {})
    refs.update(load_references([r for r in requests if r.reference not in refs]))
    # One sampler batch never mixes ways of conditioning (their condition tensors differ) or settings other
    # than guidance, which the sampler takes per row.
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        settings = samplers[i].model_dump(exclude={"guidance_anatomy", "guidance_style"})
        key = json.dumps([r.mode, r.style_prompt is not None, settings], sort_keys=True)
        groups.setdefault(key, []).append(i)

    slots: list[int] = []  # the output position of each image made so far
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    request_of = [i for i, r in enumerate(requests) for _ in range(r.n)]
    seeds = [s for r in requests for s in r.seeds]
    first_slot = np.cumsum([0] + [r.n for r in requests])
    with tqdm(total=len(seeds), desc="sampling", unit="image", disable=not progress) as bar:
        for members in groups.values():
            items = [(i, int(first_slot[i]) + k) for i in members for k in range(requests[i].n)]
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                unique = list(dict.fromkeys(i for i, _ in chunk))
                row = {i: j for j, i in enumerate(unique)}
                cond = _conditions(model, [requests[i] for i in unique], refs)  # one row per request
                if len(unique) < len(chunk):  # one row per image: repeat each request's row
                    index = torch.tensor([row[i] for i, _ in chunk])
                    cond = {k: v.index_select(0, index.to(v.device)) for k, v in cond.items()}
                chunk_seeds = [seeds[slot] for _, slot in chunk]
                guidance = _row_guidance(chunk, samplers)
                extra = {} if guidance is None else {"guidance": guidance}  # per row only where rows differ
                img, mask = model.generate(cond, chunk_seeds, samplers[unique[0]], use_ema=use_ema, **extra)
                images.append(img.float().cpu())  # (n_i, 3, H, W)
                masks.append(mask.float().cpu())  # (n_i, 1, H, W)
                slots.extend(slot for _, slot in chunk)
                bar.update(len(chunk))
    order = torch.as_tensor(np.argsort(slots, kind="stable"))
    return Samples(
        requests=requests,
        request_of=request_of,
        seeds=seeds,
        samplers=samplers,
        images=torch.cat(images)[order],  # (N, 3, H, W)
        masks=torch.cat(masks)[order],  # (N, 1, H, W)
    )


def write_samples(samples: Samples, out_dir: Path, model: ModelRef) -> Path:
    """Write ``<i>.png``, ``<i>_mask.png`` (the pseudo-mask, 0/255) and ``samples.json`` to ``out_dir``.

    Both PNGs of image ``i`` carry its provenance (``vgmedgen:synthetic``, model version id,
    seed, conditions, sampler settings; the mask also ``kind = pseudo-mask``). ``samples.json``
    lists every image with the same fields, the model version (reference, directory, manifest
    sha256) and, when every request used the same, the sampler settings.

    Returns:
        The path of ``samples.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rgb, binary = samples.images_uint8(), samples.masks_uint8()
    entries = []
    for i in range(len(samples)):
        save_png(rgb[i], out_dir / f"{i}.png", samples.provenance(i, model.id, kind="image"))
        save_png(binary[i], out_dir / f"{i}_mask.png", samples.provenance(i, model.id, kind="pseudo-mask"))
        request = samples.requests[samples.request_of[i]]
        entries.append(
            {
                "image": f"{i}.png",
                "mask": f"{i}_mask.png",
                "seed": samples.seeds[i],
                **request.conditions(),
                "model_version": model.id,
                **samples.settings(i),
            }
        )
    index: dict[str, Any] = {
        "model_version": {
            "ref": model.ref,
            "directory": str(model.path.resolve()),
            "manifest_sha256": model.id,
        }
    }
    settings = {json.dumps(samples.settings(i), sort_keys=True) for i in range(len(samples))}
    if len(settings) == 1:
        index["sampler"] = samples.settings(0)
    index["samples"] = entries
    path = out_dir / "samples.json"
    path.write_text(json.dumps(index, indent=2))
    return path


# Request field -> the flag of jobs/sample.py that sets it (messages name the flag).
SAMPLE_FLAGS = {
    "anatomy_prompt": "--anatomy",
    "style_prompt": "--style",
    "caption": "--caption",
    "reference": "--reference",
    "n": "--n",
    "seed": "--seed",
    "num_steps": "--steps",
    "guidance_anatomy": "--guidance-anatomy",
    "guidance_style": "--guidance-style",
}


def request_from_flags(values: Mapping[str, Any]) -> SampleRequest:
    """The request the sample job's flags describe (``values`` by request field, None = not given); a bad
    request fails here, naming the flag, before any model loads."""
    fields = dict(values)
    if fields.get("reference"):
        fields["reference"] = str(Path(fields["reference"]).expanduser().resolve())
    return parse_request({k: v for k, v in fields.items() if v is not None}, names=SAMPLE_FLAGS)


def sample_to_directory(
    cfg: Any, model: str, request: SampleRequest, out: str | Path | None, *, progress: bool = True
) -> tuple[Path, Path, int]:
    """The sample job: resolve ``model`` in ``cfg``'s store, generate ``request`` in this process and write
    it with :func:`write_samples` to ``out`` (default ``<output_root>/samples/<version id[:12]>-seed<seed>``).

    Returns:
        The output directory, the path of ``samples.json`` and the number of images.
    """
    from vgmedgen.platform.tracking import resolve_model

    references = load_references([request], name="--reference")
    ref = resolve_model(model, cfg)
    samples = generate_samples(load_model(ref.path), [request], references=references, progress=progress)
    directory = Path(out).expanduser() if out else cfg.root / "samples" / f"{ref.id[:12]}-seed{request.seed}"
    return directory, write_samples(samples, directory, ref), len(samples)
