"""Lesion masks: where each record's mask came from, how many a split holds, and an automatic fallback.

A record's mask drives three things (docs/datasets.md, docs/method.md): the anatomy prompt (size,
position, shape and border are measured from it), the stage-1 segmentor's Dice supervision, and so
the model's anatomy control. A dataset without masks still prepares, but every one of those is lost,
so the prepare job reports the count per split (:func:`mask_report`) and the train job refuses to
train the visual stage on too few (:func:`check_mask_supervision`) unless the user supplies masks or
chooses automatic ones.

Mask sources, recorded per record as ``attributes["mask_source"]``:

- ``"dataset"``: the dataset's own mask files (or its word that the image holds no lesion, e.g. a
  BUSI normal image, whose mask is all zero);
- ``"auto:otsu"``: made by :func:`otsu_lesion_mask` because the dataset had none and the data
  config asked for ``data.mask_source=auto``;
- None: no mask (the record's ``mask`` column is null).

Records written before this attribute existed count as ``"dataset"`` when they hold a mask.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import color, filters, measure, morphology, transform

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.records import SPLITS, read_records

__all__ = [
    "AUTO_MASK_SOURCE",
    "DATASET_MASK_SOURCE",
    "MASK_HOWTO",
    "NO_MASK",
    "MaskSupervisionError",
    "check_mask_supervision",
    "mask_census",
    "mask_line",
    "mask_report",
    "mask_sources_of",
    "otsu_lesion_mask",
    "records_mask_census",
]

DATASET_MASK_SOURCE = "dataset"
AUTO_MASK_SOURCE = "auto:otsu"
#: The census key of records without a mask.
NO_MASK = "none"

#: Where each dataset's lesion masks come from, as the fix a message gives.
MASK_HOWTO: dict[str, str] = {
    "ham10000": (
        "HAM10000's lesion masks are a separate download from its images: "
        "HAM10000_segmentations_lesion_tschandl.zip on the HAM10000 page of Harvard Dataverse "
        "(doi:10.7910/DVN/DBW86T, one ISIC_<id>_segmentation.png per image); unpack it anywhere under data.root "
        "and run prepare again (the ISIC 2018 Task 1 masks are for other ISIC images, not HAM10000's)"
    ),
    "kvasir_seg": (
        "Kvasir-SEG ships a mask per image in Kvasir-SEG/masks/<id>.jpg (kvasir-seg.zip); "
        "unpack the whole archive under data.root"
    ),
    "busi": (
        "BUSI ships '<name>_mask.png' beside each image in Dataset_BUSI_with_GT/<class>/; "
        "use a copy of the release that keeps them"
    ),
    "csv": (
        "give each row's mask file in the CSV's 'mask' column (a path like 'image'; several joined by ';'; "
        "'empty' for an image with no lesion)"
    ),
    "synthderm": "SynthDerm renders a mask with every image",
}

#: What a record without a mask costs, said once for the prepare report and the train refusal.
MISSING_MASK_COST = (
    "a record without a mask gets an anatomy prompt without size, position, shape or border "
    "(only the noun and body site), gives the stage-1 segmentor no Dice supervision, and a model trained "
    "on such records cannot be steered by anatomy prompts"
)

# Automatic masks: a component smaller than this fraction of the image is noise, not a lesion.
_AUTO_MIN_AREA_FRACTION = 0.002


class MaskSupervisionError(ConfigError):
    """The train split holds fewer lesion masks than ``train.min_mask_fraction`` asks; the message gives the fix."""


# ---------------------------------------------------------------------------------------------
# Automatic lesion masks
# ---------------------------------------------------------------------------------------------


def otsu_lesion_mask(image: np.ndarray) -> np.ndarray | None:
    """A lesion mask of a dermoscopy-like image by classical segmentation, or None when none is found.

    The usual unsupervised dermoscopy baseline (Otsu thresholding plus morphology and the largest
    component), made robust to what defeats a plain threshold of lightness: the dermatoscope's dark
    aperture, vignetting, and pink or low-contrast lesions.

    1. Colour in CIELAB, smoothed (Gaussian, sigma = side/128) against noise and hair.
    2. Field of view: near-black pixels (L* < 15) connected to the border are the dermatoscope's dark
       aperture and are left out.
    3. Illumination: L* minus its heavy blur over the field of view (sigma = side/4, normalised
       convolution on a grid of about 64 px), so vignetting falloff does not pass for a lesion.
    4. Feature: the colour distance (Delta E 1976) to the field of view's median colour, i.e. to the
       skin, which covers most of the image. Lesions darker, redder (pink) or bluer than the skin
       all stand out; a threshold of lightness alone misses pink and low-contrast lesions.
    5. Otsu's threshold of that distance over the field of view; opening and closing with a disc
       (radius side/64) to drop hairs and ruler ticks; holes filled.
    6. The largest component, preferring those that do not reach into an image corner (a corner
       blob is left-over vignetting), unless it covers most of the image.

    Measured on SynthDerm (its true masks known), seed 0: mean Dice 0.88 (median 0.95) at 64 and at
    128 px over its first 100 images, 0.86 at 256 px over its first 30, with hair, rulers, bubbles and
    vignetting among them (a plain Otsu threshold of lightness: about 0.72); small satellites of a
    lesion are dropped by design (largest component). About 3 ms an image at 64 px, 30 at 256, 160
    at 512 on one CPU core. A baseline for dermoscopy: check its masks before using it on another
    modality.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W) bool, or None when no component of at least 0.2% of the image remains.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"otsu_lesion_mask needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    side = min(h, w)
    lab = color.rgb2lab(image)  # (H, W, 3): L* in [0, 100]
    sigma = max(side / 128, 0.5)
    lab = np.stack([filters.gaussian(lab[..., c], sigma=sigma, preserve_range=True) for c in range(3)], -1)
    lightness = lab[..., 0]  # (H, W)

    # The aperture: dark regions touching the border.
    dark, _ = ndimage.label(lightness < 15)
    edge = np.unique(np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]]))
    fov = ~np.isin(dark, edge[edge > 0])  # (H, W)
    if fov.sum() < 16:
        return None

    # Flatten illumination inside the field of view (normalised convolution ignores the aperture). The
    # shading is smooth, so it is estimated on a grid of about 64 px a side and interpolated back up.
    f = max(1, side // 64)
    num = transform.downscale_local_mean(np.where(fov, lightness, 0.0), (f, f))
    den = transform.downscale_local_mean(fov.astype(np.float64), (f, f))
    big = side / 4 / f
    shade = filters.gaussian(num, sigma=big) / np.maximum(filters.gaussian(den, sigma=big), 1e-6)
    shade = transform.resize(shade, (h, w), order=1)  # (H, W)
    lab[..., 0] = lightness - shade + np.median(lightness[fov])
    skin = np.median(lab[fov], axis=0)  # (3,)
    distance = np.linalg.norm(lab - skin, axis=-1)  # (H, W)
    if np.ptp(distance[fov]) < 1e-6:
        return None  # a flat image: nothing to threshold
    fg = (distance > filters.threshold_otsu(distance[fov])) & fov

    disc = morphology.disk(max(1, round(side / 64)), decomposition="sequence")  # fast, nearly a disc
    fg = morphology.closing(morphology.opening(fg, disc), disc)
    fg = ndimage.binary_fill_holes(fg)
    labels = measure.label(fg)
    regions = [r for r in measure.regionprops(labels) if r.area >= _AUTO_MIN_AREA_FRACTION * h * w]
    if not regions:
        return None
    k = max(2, side // 16)

    def in_corner(r: Any) -> bool:  # a skimage RegionProperties
        y0, x0, y1, x1 = r.bbox
        return (y0 < k or y1 > h - k) and (x0 < k or x1 > w - k) and r.area < 0.5 * h * w

    best = max([r for r in regions if not in_corner(r)] or regions, key=lambda r: r.area)
    return labels == best.label


# ---------------------------------------------------------------------------------------------
# Counting masks
# ---------------------------------------------------------------------------------------------


def mask_census(splits: Sequence[str], sources: Sequence[str | None]) -> dict[str, dict[str, int]]:
    """Records per split by mask source: ``{"train": {"dataset": 900, "none": 300}, ...}``, splits in the
    order train, val, test.

    Args:
        splits: each record's split.
        sources: each record's mask source (None: no mask, counted as :data:`NO_MASK`).
    """
    if len(splits) != len(sources):
        raise ValueError(f"{len(splits)} splits but {len(sources)} mask sources")
    counts: dict[str, Counter] = {}
    for split, source in zip(splits, sources):
        counts.setdefault(split, Counter())[source or NO_MASK] += 1
    order = sorted(counts, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    return {s: dict(sorted(counts[s].items())) for s in order}


def mask_sources_of(masks: Sequence[bytes | None], attributes: Sequence[str | Mapping]) -> list[str | None]:
    """Each record's mask source from its ``mask`` and ``attributes`` columns (see the module docstring)."""
    out: list[str | None] = []
    for mask, attrs in zip(masks, attributes):
        if mask is None:
            out.append(None)
            continue
        attrs = json.loads(attrs) if isinstance(attrs, str) else attrs
        out.append((attrs or {}).get("mask_source") or DATASET_MASK_SOURCE)
    return out


def records_mask_census(records_dir: str | Path) -> dict[str, dict[str, int]]:
    """:func:`mask_census` of a records directory (reads only the split, mask and attributes columns)."""
    table = read_records(records_dir, columns=["split", "mask", "attributes"])
    sources = mask_sources_of(table.column("mask").to_pylist(), table.column("attributes").to_pylist())
    return mask_census(table.column("split").to_pylist(), sources)


def _with_mask(per_source: Mapping[str, int]) -> tuple[int, int]:
    total = sum(per_source.values())
    return total - per_source.get(NO_MASK, 0), total


# ---------------------------------------------------------------------------------------------
# What prepare says, and what train refuses
# ---------------------------------------------------------------------------------------------


def mask_line(census: Mapping[str, Mapping[str, int]]) -> str:
    """One line: masks of all records, per split, and by source, e.g.
    ``Lesion masks: 0 of 6 records (train 0/4, val 0/1, test 0/1)``."""
    have = sum(_with_mask(c)[0] for c in census.values())
    total = sum(_with_mask(c)[1] for c in census.values())
    per_split = ", ".join(f"{s} {_with_mask(census[s])[0]}/{_with_mask(census[s])[1]}" for s in census)
    sources = Counter()
    for c in census.values():
        sources.update({k: v for k, v in c.items() if k != NO_MASK})
    by_source = "; ".join(f"{k} {v}" for k, v in sorted(sources.items()))
    return f"Lesion masks: {have} of {total} records ({per_split})" + (
        f"; from {by_source}" if by_source else ""
    )


def mask_report(dataset: str, census: Mapping[str, Mapping[str, int]], mask_source: str) -> str | None:
    """The prepare job's warning when records lack masks (None when every record has one).

    Says how many lack one per split, what that costs, where this dataset's masks come from, and
    that ``data.mask_source=auto`` makes automatic ones (or that it did, for how many).
    """
    missing = {s: c.get(NO_MASK, 0) for s, c in census.items()}
    if not any(missing.values()):
        auto = sum(c.get(AUTO_MASK_SOURCE, 0) for c in census.values())
        if auto:
            return (
                f"{auto} records carry automatic lesion masks ({AUTO_MASK_SOURCE}, attributes.mask_source), not "
                "expert ones: their anatomy prompts and the segmentor's supervision are only as good as those masks"
            )
        return None
    total_missing = sum(missing.values())
    total = sum(_with_mask(c)[1] for c in census.values())
    per_split = ", ".join(f"{s} {n} of {_with_mask(census[s])[1]}" for s, n in missing.items())
    lines = [
        f"{total_missing} of {total} {dataset} records have no lesion mask ({per_split}).",
        f"What that costs: {MISSING_MASK_COST}.",
        f"Where the masks come from: {MASK_HOWTO.get(dataset, MASK_HOWTO['csv'])}.",
    ]
    if mask_source == "auto":
        lines.append(
            f"data.mask_source=auto found no lesion in these {total_missing} images (they keep no mask)."
        )
    else:
        lines.append(
            "Or set data.mask_source=auto to segment the images without a mask automatically (Otsu threshold, "
            f"a dermoscopy baseline), labelled '{AUTO_MASK_SOURCE}' in attributes.mask_source."
        )
    return "\n".join(lines)


def check_mask_supervision(
    census: Mapping[str, Mapping[str, int]], min_fraction: float, dataset: str, records_dir: str | Path = ""
) -> None:
    """Refuse to train the visual stage when the train split holds too few lesion masks.

    Args:
        census: :func:`mask_census` of the records.
        min_fraction: ``train.min_mask_fraction``; 0 never refuses.
        dataset: the dataset name (for where its masks come from).
        records_dir: named in the message.

    Raises:
        MaskSupervisionError: fewer than ``ceil(min_fraction * n)`` of the ``n`` train records have a
            mask; the message gives the count, the minimum and the three ways out.
    """
    have, total = _with_mask(census.get("train", {}))
    need = math.ceil(min_fraction * total - 1e-9)
    if total == 0 or have >= need:
        return
    where = f" at {records_dir}" if records_dir else ""
    raise MaskSupervisionError(
        f"The visual stage trains its segmentor on lesion masks, but only {have} of the {total} train records"
        f"{where} have one ({have / total:.0%}); train.min_mask_fraction={min_fraction:g} asks for at least {need}. "
        f"What that costs: {MISSING_MASK_COST}. Fix it in one of three ways: "
        f"(1) add the masks: {MASK_HOWTO.get(dataset, MASK_HOWTO['csv'])}; "
        f"(2) set data.mask_source=auto to segment the images automatically at prepare time (Otsu threshold, "
        f"a dermoscopy baseline; the records say '{AUTO_MASK_SOURCE}' in attributes.mask_source); "
        f"(3) set train.min_mask_fraction={math.floor(100 * have / total) / 100:g} to train anyway, knowingly."
    )
