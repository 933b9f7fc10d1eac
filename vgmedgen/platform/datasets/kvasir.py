"""Kvasir-SEG (colonoscopy, 1,000 polyp images, one class) laid out as the public release.

Layout (docs/datasets.md, section "Kvasir-SEG"): ``Kvasir-SEG/images/<id>.jpg``, ``Kvasir-SEG/masks/<id>.jpg``
(lossy, often 3-channel JPEG masks: :func:`process_item` thresholds them) and
``kavsir_bboxes.json`` (sic) ``{id: {"height", "width", "bbox": [{"label", "xmin", "ymin",
"xmax", "ymax"}, ...]}}``.

Decisions:
- The root may be the ``Kvasir-SEG`` folder itself, the folder that contains it, or any
  folder up to two levels above a unique folder holding both ``images/`` and ``masks/``.
- Every image must have a mask of the same stem (any image suffix); a missing mask is a
  :class:`DatasetError` unless ``skip_missing_files`` (then the image is skipped).
- Bounding boxes: ``kavsir_bboxes.json`` or ``kvasir_bboxes.json`` in the Kvasir-SEG folder
  or the root; metadata gets ``bbox_count``, ``bboxes`` ([xmin, ymin, xmax, ymax] in original
  pixels) and ``original_size`` ([width, height]) where the file lists the id.
- Official split lists: files named ``train.txt``, ``val.txt`` (also ``valid.txt``,
  ``validation.txt``) and ``test.txt`` anywhere under the root (the shallowest of each name
  wins; two equally shallow ones are an error), one id per line (a line may also be a file
  name or path: its stem is the id; blank lines and ``#`` comments are ignored). They set
  ``official_split``; an id in two lists is an error; listed ids without an image are
  missing files (error unless ``skip_missing_files``); images in no list keep
  ``official_split=None`` with a warning.
- label ``polyp``; group None (each image is its own group).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from vgmedgen.platform.datasets.common import (
    IMAGE_SUFFIXES,
    DatasetError,
    DatasetWarning,
    ReaderOptions,
    SourceItem,
    relative_source,
    report_missing,
)

__all__ = ["SPLIT_FILE_NAMES", "read_kvasir_seg"]

#: Accepted split-list file names and the split each one sets.
SPLIT_FILE_NAMES = {
    "train.txt": "train",
    "val.txt": "val",
    "valid.txt": "val",
    "validation.txt": "val",
    "test.txt": "test",
}

_BBOX_FILE_NAMES = ("kavsir_bboxes.json", "kvasir_bboxes.json")


def _find_base(root: Path) -> Path:
    """The folder holding ``images/`` and ``masks/``: the root or a unique folder below it."""

    def is_base(p: Path) -> bool:
        return (p / "images").is_dir() and (p / "masks").is_dir()

    if is_base(root):
        return root
    candidates = sorted(p for p in root.glob("*") if p.is_dir() and is_base(p))
    if not candidates:
        candidates = sorted(p for p in root.glob("*/*") if p.is_dir() and is_base(p))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DatasetError(
            f"No Kvasir-SEG layout under {root}: expected Kvasir-SEG/images/<id>.jpg and "
            "Kvasir-SEG/masks/<id>.jpg. Point data.root at the Kvasir-SEG folder or the folder containing it."
        )
    raise DatasetError(
        f"Several folders under {root} hold images/ and masks/: "
        f"{', '.join(str(c) for c in candidates)}; point data.root at the one to use"
    )


def _index_images(folder: Path) -> dict[str, Path]:
    """Image files of one folder by stem (sorted, first suffix wins on a clash)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            out.setdefault(p.stem, p)
    return out


def _read_bboxes(base: Path, root: Path) -> dict[str, Any]:
    for folder in (base, root):
        for name in _BBOX_FILE_NAMES:
            path = folder / name
            if path.is_file():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as exc:
                    raise DatasetError(f"Cannot read bounding boxes {path}: {exc}") from None
                if not isinstance(data, dict):
                    raise DatasetError(
                        f"{path} should map image ids to box entries, got {type(data).__name__}"
                    )
                return data
    return {}


def _bbox_metadata(entry: Any) -> dict[str, Any]:
    """``bbox_count``, ``bboxes``, ``original_size`` from one bounding-box entry."""
    if not isinstance(entry, dict):
        return {}
    boxes = []
    for box in entry.get("bbox") or []:
        try:
            boxes.append([float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (KeyError, TypeError, ValueError):
            continue
    out: dict[str, Any] = {"bbox_count": len(boxes), "bboxes": boxes}
    if "width" in entry and "height" in entry:
        out["original_size"] = [entry["width"], entry["height"]]
    return out


def _read_split_lists(root: Path) -> dict[str, str]:
    """id -> official split from the split-list files under the root (see module docstring)."""
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower() in SPLIT_FILE_NAMES:
                found.setdefault(name.lower(), []).append(Path(dirpath) / name)
    split_of: dict[str, str] = {}
    where: dict[str, Path] = {}
    for name in sorted(found):
        paths = sorted(found[name], key=lambda p: (len(p.relative_to(root).parts), p.as_posix()))
        if len(paths) > 1 and len(paths[0].parts) == len(paths[1].parts):
            raise DatasetError(
                f"Two split lists named {name} at the same depth: {paths[0]} and {paths[1]}; keep one"
            )
        path, split = paths[0], SPLIT_FILE_NAMES[name]
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            item_id = Path(line.replace("\\", "/")).name
            stem = Path(item_id).stem if Path(item_id).suffix.lower() in IMAGE_SUFFIXES else item_id
            previous = split_of.get(stem)
            if previous is not None and previous != split:
                raise DatasetError(f"Kvasir-SEG id {stem} is in two split lists: {where[stem]} and {path}")
            split_of[stem] = split
            where[stem] = path
    return split_of


def read_kvasir_seg(root: Path, options: ReaderOptions) -> list[SourceItem]:
    """Items of a Kvasir-SEG tree (see the module docstring for the layout and decisions)."""
    if not root.is_dir():
        raise DatasetError(f"Kvasir-SEG root {root} is not a directory")
    base = _find_base(root)
    images = _index_images(base / "images")
    masks = _index_images(base / "masks")
    bboxes = _read_bboxes(base, root)
    splits = _read_split_lists(root)
    missing_masks = [f"{base / 'masks' / k}.jpg" for k in sorted(images) if k not in masks]
    report_missing(
        "Kvasir-SEG images", missing_masks, options, "Every Kvasir-SEG image needs its mask in masks/."
    )
    listed_missing = [k for k in sorted(splits) if k not in images]
    report_missing(
        "Kvasir-SEG split-list ids",
        listed_missing,
        options,
        "The split lists name images that are not in images/; is the download complete?",
    )
    items = []
    for item_id, path in images.items():
        if item_id not in masks:
            continue
        items.append(
            SourceItem(
                id=item_id,
                dataset="kvasir_seg",
                source=relative_source(path, root),
                image_path=str(path),
                mask_paths=(str(masks[item_id]),),
                mask_policy="files",
                label="polyp",
                group=None,
                metadata=_bbox_metadata(bboxes.get(item_id)),
                official_split=splits.get(item_id),
            )
        )
    if splits:
        unlisted = sum(1 for it in items if it.official_split is None)
        if unlisted:
            warnings.warn(
                f"{unlisted} Kvasir-SEG images are in no split list; they get no official split",
                DatasetWarning,
                2,
            )
    return items
