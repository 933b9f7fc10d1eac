"""BUSI (breast ultrasound, 780 images: benign 437, malignant 210, normal 133).

Layout (docs/datasets.md, section "BUSI"): ``Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (1).png``
with masks ``benign (1)_mask.png`` and, for extra lesions, ``benign (1)_mask_1.png``,
``_mask_2.png`` (merged with OR). File names hold spaces and parentheses.

Decisions:
- The root may be ``Dataset_BUSI_with_GT`` itself, the folder containing it, or any folder
  up to two levels above a unique folder holding at least one of the class folders.
- Class = folder name (lower case); id = ``<class>_<n>`` for ``<class> (<n>).png``, else
  ``<class>_<sanitised stem>``.
- Masks are found by name (``<stem>_mask.png``, ``<stem>_mask_<k>.png``), ordered base mask
  first then by k. A normal image without a mask gets ``mask_policy="empty"`` (normal masks
  are black; some copies lack them, and a missing mask must never be a class hint). A benign
  or malignant image without a mask gets ``"none"`` (its lesion is unknown) with a warning;
  masks without an image are reported too.
- group None: about 235 images are near-duplicates (some across benign/malignant), so the
  prepare job groups them by perceptual hash
  (:func:`vgmedgen.platform.datasets.process.group_near_duplicates`) before splitting.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from vgmedgen.platform.datasets.common import (
    IMAGE_SUFFIXES,
    DatasetError,
    DatasetWarning,
    ReaderOptions,
    SourceItem,
    relative_source,
    sanitize_id,
)

__all__ = ["CLASSES", "read_busi"]

CLASSES = ("benign", "malignant", "normal")

_MASK_RE = re.compile(r"^(?P<base>.+?)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)
_NUMBERED_RE = re.compile(r"^(?P<cls>[A-Za-z]+)\s*\((?P<n>\d+)\)$")


def _class_dirs(folder: Path) -> dict[str, Path]:
    out = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_dir() and p.name.lower() in CLASSES:
                out.setdefault(p.name.lower(), p)
    return out


def _find_base(root: Path) -> Path:
    if _class_dirs(root):
        return root
    for pattern in ("*", "*/*"):
        candidates = sorted(p for p in root.glob(pattern) if p.is_dir() and _class_dirs(p))
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise DatasetError(
                f"Several folders under {root} hold BUSI class folders: "
                f"{', '.join(str(c) for c in candidates)}; point data.root at the one to use"
            )
    raise DatasetError(
        f"No BUSI layout under {root}: expected Dataset_BUSI_with_GT/benign, /malignant, /normal "
        "holding 'benign (1).png' and 'benign (1)_mask.png'. Point data.root at Dataset_BUSI_with_GT "
        "or the folder containing it."
    )


def _item_id(cls: str, stem: str) -> str:
    m = _NUMBERED_RE.match(stem)
    if m and m.group("cls").lower() == cls:
        return f"{cls}_{int(m.group('n'))}"
    clean = sanitize_id(stem)
    return clean if clean.lower().startswith(cls + "_") else f"{cls}_{clean}"


def read_busi(root: Path, options: ReaderOptions) -> list[SourceItem]:
    """Items of a BUSI tree (see the module docstring for the layout and decisions)."""
    if not root.is_dir():
        raise DatasetError(f"BUSI root {root} is not a directory")
    base = _find_base(root)
    items: list[SourceItem] = []
    no_mask_lesions: list[str] = []
    orphan_masks: list[str] = []
    for cls, folder in _class_dirs(base).items():
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for p in sorted(folder.iterdir()):
            if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                continue
            m = _MASK_RE.match(p.stem)
            if m:
                k = int(m.group("k")) if m.group("k") is not None else -1  # base mask first
                masks.setdefault(m.group("base"), []).append((k, p))
            else:
                images.setdefault(p.stem, p)
        orphan_masks += [str(paths[0][1]) for stem, paths in masks.items() if stem not in images]
        for stem, path in images.items():
            mask_paths = tuple(str(p) for _, p in sorted(masks.get(stem, [])))
            if mask_paths:
                policy = "files"
            elif cls == "normal":
                policy = "empty"
            else:
                policy = "none"
                no_mask_lesions.append(str(path))
            items.append(
                SourceItem(
                    id=_item_id(cls, stem),
                    dataset="busi",
                    source=relative_source(path, root),
                    image_path=str(path),
                    mask_paths=mask_paths,
                    mask_policy=policy,
                    label=cls,
                    group=None,
                )
            )
    if no_mask_lesions:
        warnings.warn(
            f"{len(no_mask_lesions)} benign/malignant BUSI images have no mask (e.g. {no_mask_lesions[0]}); "
            "their records get no mask",
            DatasetWarning,
            2,
        )
    if orphan_masks:
        warnings.warn(
            f"{len(orphan_masks)} BUSI masks have no image (e.g. {orphan_masks[0]}); ignored",
            DatasetWarning,
            2,
        )
    return items
