"""One source item -> one canonical record (docs/datasets.md), and near-duplicate grouping.

:func:`process_item` decodes an item's image and masks, resizes both with the same geometry,
measures anatomy and style (:mod:`vgmedgen.platform.datasets.measure`), writes the prompts, and returns
a dict with every :data:`vgmedgen.platform.records.RECORD_SCHEMA` column except ``split``
(the prepare job assigns splits by group). It is a pure function of the item and the
settings, so the prepare job can map it over items in parallel. With ``mask_source="auto"`` an item
without a mask gets an automatic one (:mod:`vgmedgen.platform.datasets.masks`).

Perceptual hashes (:func:`perceptual_hash`, stored as ``attributes["phash"]``) let the prepare
job group near-duplicates (:func:`group_near_duplicates`; BUSI has about 235) before splitting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from scipy.fft import dctn

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.datasets import captions, masks, measure
from vgmedgen.platform.datasets.common import CorruptInputError, SourceItem
from vgmedgen.platform.records import encode_png

__all__ = [
    "DATASET_VOCABULARY",
    "RESIZE_POLICIES",
    "Vocabulary",
    "group_near_duplicates",
    "load_mask",
    "load_rgb",
    "perceptual_hash",
    "phash_distance",
    "process_item",
    "resize_pair",
]

ResizePolicy = Literal["center_crop", "pad", "stretch"]
MaskSource = Literal["dataset", "auto"]
RESIZE_POLICIES: tuple[str, ...] = ("center_crop", "pad", "stretch")

#: Mask and image sizes may differ by this relative aspect-ratio error and still be paired
#: (the mask is resized to the image); larger differences mean the wrong mask.
_ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class Vocabulary:
    """Words the prompt builders use for one dataset.

    Attributes:
        noun: what the mask marks.
        background: what surrounds it.
        modality: the imaging modality phrase (style text), or None.
    """

    noun: str = "lesion"
    background: str = "background"
    modality: str | None = None


#: Prompt words per dataset; any other dataset name uses the ``csv`` entry.
DATASET_VOCABULARY: dict[str, Vocabulary] = {
    "ham10000": Vocabulary("lesion", "skin", "dermoscopic image"),
    "kvasir_seg": Vocabulary("polyp", "mucosa", "colonoscopy image"),
    "busi": Vocabulary("lesion", "breast tissue", "breast ultrasound image"),
    "csv": Vocabulary("lesion", "background", None),
}

#: Metadata keys the prompt builders read (first present wins); nothing else reaches a prompt
#: (in particular not HAM10000's ``dx_type``, which is label provenance).
SITE_KEYS = ("localization", "site")
COHORT_KEYS = ("cohort", "device")


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _open_loaded(path: str | Path, what: str) -> Image.Image:
    """Open and fully decode a file, turning any decoder failure into CorruptInputError."""
    try:
        im = Image.open(path)
        im.load()  # decode now: a truncated JPEG only fails here
        return im
    except FileNotFoundError:
        raise CorruptInputError(f"{what} {path} does not exist") from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, zlib/struct errors...
        raise CorruptInputError(f"Cannot decode {what} {path}: {type(exc).__name__}: {exc}") from None


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image as (H, W, 3) uint8 RGB (grayscale, palette, RGBA, 16-bit all accepted).

    Raises:
        CorruptInputError: the file is missing, truncated or not an image.
    """
    im = _open_loaded(path, "image")
    with im:
        if im.mode.startswith("I;16"):
            # 16-bit grayscale (some ultrasound exports): PIL's convert("RGB") would clip.
            gray = (np.asarray(im, dtype=np.float64) / 257.0).round().astype(np.uint8)  # (H, W)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if im.mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            top = arr.max() if arr.max() > 255 else 255.0
            gray = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        # RGBA drops alpha; P/L/LA/CMYK/YCbCr go through PIL's own conversion.
        return np.asarray(im.convert("RGB"))


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode a mask file as (H, W) bool, at the image's ``size`` = (width, height).

    Lossy JPEG masks (often 3-channel) are reduced to luma and thresholded at 127; masks whose
    values are only 0/1 are thresholded at 0. A mask of another size but the same aspect ratio
    is resized (nearest); another aspect ratio means it is not this image's mask.

    Raises:
        CorruptInputError: unreadable file or a mask that cannot belong to the image.
    """
    im = _open_loaded(path, "mask")
    with im:
        if im.mode.startswith("I") or im.mode == "F":
            values = np.asarray(im, dtype=np.float64)
            gray = np.where(values > (127 if values.max() > 1 else 0), 255, 0).astype(np.uint8)
        else:
            gray = np.asarray(im.convert("L"))  # (h, w) uint8
    fg = gray > (127 if gray.max(initial=0) > 1 else 0)
    h, w = fg.shape
    if (w, h) != tuple(size):
        aspect_error = abs((w / h) / (size[0] / size[1]) - 1.0)
        if aspect_error > _ASPECT_TOLERANCE:
            raise CorruptInputError(
                f"mask {path} is {w}x{h} but its image is {size[0]}x{size[1]}; it is not this image's mask"
            )
        resized = Image.fromarray(fg.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        fg = np.asarray(resized) > 127
    return fg


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def resize_pair(
    image: np.ndarray, mask: np.ndarray | None, resolution: int, resize: ResizePolicy
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an image and its mask to ``resolution`` x ``resolution`` with the same geometry.

    Policies: ``center_crop`` (the central square of side min(H, W), then scaled),
    ``pad`` (scaled so the long side fits, centred on black), ``stretch`` (scaled per axis).
    Images resample with Lanczos, masks with nearest neighbour so they stay binary.

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) bool, or None.
        resolution: output side in pixels.
        resize: one of :data:`RESIZE_POLICIES`.

    Returns:
        (resolution, resolution, 3) uint8 image and (resolution, resolution) bool mask or None.
    """
    if resize not in RESIZE_POLICIES:
        raise ConfigError(f"Unknown resize policy {resize!r}; valid: {', '.join(RESIZE_POLICIES)}")
    if resolution < 1:
        raise ConfigError(f"resolution must be a positive number of pixels, got {resolution}")
    h, w = image.shape[:2]
    images = [(Image.fromarray(image), Image.Resampling.LANCZOS)]
    if mask is not None:
        images.append((Image.fromarray(mask.astype(np.uint8) * 255), Image.Resampling.NEAREST))
    out = []
    for im, resample in images:
        if resize == "stretch":
            res = im.resize((resolution, resolution), resample)
        elif resize == "center_crop":
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            res = im.resize((resolution, resolution), resample, box=(left, top, left + side, top + side))
        else:  # pad
            scale = resolution / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            canvas = Image.new(im.mode, (resolution, resolution), 0)
            canvas.paste(im.resize((nw, nh), resample), ((resolution - nw) // 2, (resolution - nh) // 2))
            res = canvas
        out.append(np.asarray(res))
    new_image = out[0]  # (R, R, 3)
    new_mask = out[1] > 127 if mask is not None else None  # (R, R)
    return new_image, new_mask


# ---------------------------------------------------------------------------------------------
# Perceptual hash and near-duplicate groups
# ---------------------------------------------------------------------------------------------


def perceptual_hash(image: np.ndarray) -> str:
    """64-bit DCT perceptual hash as 16 hex digits.

    The image is reduced to 32x32 grayscale; bit i is set where the i-th of the 8x8
    lowest-frequency DCT coefficients exceeds their median (the usual pHash recipe), so
    rescaled, recompressed or slightly brightened copies land within a few bits.

    Args:
        image: (H, W, 3) uint8 RGB.
    """
    gray = Image.fromarray(image).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    coeffs = dctn(np.asarray(gray, dtype=np.float64), type=2)[:8, :8]  # (8, 8)
    bits = (coeffs > np.median(coeffs)).ravel()  # (64,)
    value = int("".join("1" if b else "0" for b in bits), 2)
    return f"{value:016x}"


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex perceptual hashes (0 = identical, 64 = opposite)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def group_near_duplicates(ids: Sequence[str], phashes: Sequence[str], max_distance: int) -> dict[str, str]:
    """Group images whose perceptual hashes are within ``max_distance`` bits, transitively.

    Union-find over all pairs (vectorised per row: about a second for 10k images). The group
    id is the smallest member id, so the result does not depend on the input order.

    Args:
        ids: record ids (unique).
        phashes: hex hashes from :func:`perceptual_hash`, aligned with ``ids``.
        max_distance: largest Hamming distance that counts as a near-duplicate (about 4-10
            for 64-bit hashes; 0 groups exact hash matches only).

    Returns:
        id -> group id, for every id.
    """
    if len(ids) != len(phashes):
        raise ValueError(f"{len(ids)} ids but {len(phashes)} hashes")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    n = len(ids)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    values = np.array([int(h, 16) for h in phashes], dtype=np.uint64)  # (n,)
    for i in range(n - 1):
        close = np.nonzero(np.bitwise_count(values[i + 1 :] ^ values[i]) <= max_distance)[0]
        for j in close:
            ri, rj = find(i), find(i + 1 + int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    smallest: dict[int, str] = {}
    for i, item_id in enumerate(ids):
        root = find(i)
        if root not in smallest or item_id < smallest[root]:
            smallest[root] = item_id
    return {item_id: smallest[find(i)] for i, item_id in enumerate(ids)}


# ---------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------


def _first(metadata: dict[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if metadata.get(k) is not None:
            return metadata[k]
    return None


def process_item(
    item: SourceItem, resolution: int, resize: ResizePolicy, mask_source: MaskSource = "dataset"
) -> dict[str, Any]:
    """Decode, resize, measure and describe one item.

    Args:
        item: from a reader.
        resolution: side of the square output in pixels.
        resize: ``center_crop``, ``pad`` or ``stretch`` (see :func:`resize_pair`).
        mask_source: ``"dataset"``: the item's own mask or none; ``"auto"``: an item without a mask
            (``mask_policy="none"``) gets :func:`masks.otsu_lesion_mask` of the resized image, when it
            finds a lesion.

    Returns:
        A record dict with every ``RECORD_SCHEMA`` column except ``split``: ``image`` (RGB PNG),
        ``mask`` (single-channel 0/255 PNG; all zero for ``mask_policy="empty"``, None for
        ``"none"``), ``group`` (``item.group`` or the id), ``caption`` (``item.caption`` when
        supplied, else generated deterministically from the id), ``anatomy_text``,
        ``style_text`` and ``attributes`` (a JSON-able dict: :func:`measure.measure_mask` keys
        (when there is a mask), :func:`measure.measure_image` keys, the bins of
        :func:`measure.describe_bins`, ``phash`` of the original image, ``mask_policy``,
        ``original_size`` [w, h], ``caption_source`` ("supplied"/"generated"),
        ``official_split``, ``mask_source`` (``"dataset"``, ``"auto:otsu"`` or None: see
        :mod:`vgmedgen.platform.datasets.masks`), and the source ``metadata``).

    Raises:
        CorruptInputError: an unreadable image or mask file (the message names it).
    """
    if mask_source not in ("dataset", "auto"):
        raise ConfigError(f"Unknown mask source {mask_source!r}; valid: dataset, auto")
    if item.mask_policy not in ("files", "empty", "none"):
        raise ValueError(f"item {item.id}: unknown mask_policy {item.mask_policy!r}")
    original = load_rgb(item.image_path)  # (H, W, 3)
    h, w = original.shape[:2]
    if item.mask_policy == "files":
        if not item.mask_paths:
            raise ValueError(f"item {item.id}: mask_policy 'files' needs mask_paths")
        mask: np.ndarray | None = np.zeros((h, w), dtype=bool)
        for path in item.mask_paths:
            mask |= load_mask(path, (w, h))  # OR-merge extra lesions (BUSI _mask_1, _mask_2)
    elif item.mask_policy == "empty":
        mask = np.zeros((h, w), dtype=bool)
    else:
        mask = None
    image, mask = resize_pair(original, mask, resolution, resize)
    source = None if mask is None else masks.DATASET_MASK_SOURCE
    if mask is None and mask_source == "auto":
        mask = masks.otsu_lesion_mask(image)
        source = None if mask is None else masks.AUTO_MASK_SOURCE

    mask_m = measure.measure_mask(mask) if mask is not None else None
    image_m = measure.measure_image(image, mask)
    vocab = DATASET_VOCABULARY.get(item.dataset, DATASET_VOCABULARY["csv"])
    # A JSON round trip keeps attributes serialisable whatever a reader put in metadata.
    metadata = json.loads(json.dumps(dict(item.metadata), default=str))
    anatomy = captions.anatomy_phrases(mask_m, site=_first(metadata, SITE_KEYS), noun=vocab.noun)
    style = captions.style_phrases(
        image_m,
        modality=vocab.modality,
        background=vocab.background,
        noun=vocab.noun,
        cohort=_first(metadata, COHORT_KEYS),
    )
    attributes: dict[str, Any] = {
        **(mask_m or {}),
        **image_m,
        **measure.describe_bins(mask_m, image_m),
        "phash": perceptual_hash(original),
        "mask_policy": item.mask_policy,
        "mask_source": source,
        "original_size": [w, h],
        "caption_source": "supplied" if item.caption else "generated",
        "official_split": item.official_split,
        "metadata": metadata,
    }
    return {
        "id": item.id,
        "dataset": item.dataset,
        "group": item.group or item.id,
        "label": item.label,
        "image": encode_png(np.ascontiguousarray(image)),
        "mask": None if mask is None else encode_png(mask.astype(np.uint8) * 255),
        "caption": item.caption or captions.caption(anatomy, style, item.id),
        "anatomy_text": captions.join_anatomy_phrases(anatomy),
        "style_text": captions.join_style_phrases(style),
        "attributes": attributes,
        "source": item.source,
    }
