"""HAM10000 (dermoscopy, 10,015 images, 7 classes) laid out as the public release.

Layout (docs/datasets.md, section "HAM10000"): images ``ISIC_<7 digits>.jpg`` anywhere under the root
(``HAM10000_images_part_1/``, ``..._part_2/``, or a mirror's own folder names: indexed
recursively); metadata ``HAM10000_metadata.csv`` (comma) or the Dataverse copy
(``HAM10000_metadata*`` or any ``*.tab``/``*.tsv``, tab-separated, with an extra ``dataset``
column: the source cohort); optional lesion masks
``HAM10000_segmentations_lesion_tschandl/ISIC_<id>_segmentation.png`` (found anywhere under
the root by name).

Decisions:
- One item per metadata row; group = ``lesion_id`` (a lesion imaged several times stays in
  one split); label = ``dx``.
- A metadata row whose image is missing is a :class:`DatasetError` (listing the first five
  and the count) unless ``skip_missing_files`` is set; ISIC images without a metadata row
  are ignored with a warning.
- The same image twice under the root (a Kaggle mirror ships ``HAM10000_images_part_1`` and
  ``ham10000_images_part_1``) is not an error: the first path in sorted order is used.
- Items with a mask file get ``mask_policy="files"``, others ``"none"`` (no mask known);
  when the mask folder exists but misses some images, a warning gives the count.
- Metadata keys: ``lesion_id``, ``age`` (int/float, None when blank), ``sex`` (None when
  "unknown"), ``localization`` (None when "unknown"), ``cohort`` (Dataverse ``dataset``
  column), ``dx_type``. ``dx_type`` is label provenance and no prompt builder reads it.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

from vgmedgen.platform.datasets.common import (
    DatasetError,
    DatasetWarning,
    ReaderOptions,
    SourceItem,
    clean_value,
    read_delimited,
    relative_source,
    report_missing,
    require_columns,
    resolve_user_path,
)

__all__ = ["REQUIRED_COLUMNS", "read_ham10000"]

REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")

_IMAGE_RE = re.compile(r"^ISIC_(\d{7})\.jpe?g$", re.IGNORECASE)
_MASK_RE = re.compile(r"^ISIC_(\d{7})_segmentation\.png$", re.IGNORECASE)
_METADATA_RE = re.compile(r"^HAM10000_metadata.*$", re.IGNORECASE)


def _index_tree(root: Path) -> tuple[dict[str, Path], dict[str, Path], list[Path]]:
    """One walk of the tree: images and masks by ISIC id, and metadata table candidates."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    tables: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # deterministic order, so the first duplicate is always the same one
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if m := _IMAGE_RE.match(name):
                images.setdefault(f"ISIC_{m.group(1)}", path)
            elif m := _MASK_RE.match(name):
                masks.setdefault(f"ISIC_{m.group(1)}", path)
            elif _METADATA_RE.match(name) or name.lower().endswith((".tab", ".tsv")):
                tables.append(path)
    return images, masks, tables


def _find_metadata(root: Path, tables: list[Path], options: ReaderOptions) -> Path:
    """The metadata table: the option, else the best candidate found under the root."""
    if options.metadata_file is not None:
        path = resolve_user_path(options.metadata_file, root)
        if not path.is_file():
            raise DatasetError(f"metadata_file {path} does not exist")
        return path
    if not tables:
        raise DatasetError(
            f"No HAM10000 metadata under {root}: expected HAM10000_metadata.csv (or the Dataverse "
            "tab-separated HAM10000_metadata.tab). Put it in the dataset root or set metadata_file."
        )

    def rank(p: Path) -> tuple[int, int, str]:
        name = p.name.lower()
        kind = 0 if name == "ham10000_metadata.csv" else (1 if _METADATA_RE.match(p.name) else 2)
        return (kind, len(p.relative_to(root).parts), p.as_posix())

    return min(tables, key=rank)


def _parse_age(value: str | None) -> int | float | None:
    value = clean_value(value)
    if value is None:
        return None
    try:
        age = float(value)
    except ValueError:
        return None
    return int(age) if age.is_integer() else age


def _unknown_to_none(value: str | None) -> str | None:
    value = clean_value(value)
    return None if value is None or value.lower() == "unknown" else value


def read_ham10000(root: Path, options: ReaderOptions) -> list[SourceItem]:
    """Items of a HAM10000 tree (see the module docstring for the layout and decisions)."""
    if not root.is_dir():
        raise DatasetError(f"HAM10000 root {root} is not a directory")
    images, masks, tables = _index_tree(root)
    meta_path = _find_metadata(root, tables, options)
    columns, rows = read_delimited(meta_path)
    require_columns(
        meta_path,
        columns,
        REQUIRED_COLUMNS,
        "HAM10000 metadata has the header lesion_id,image_id,dx,dx_type,age,sex,localization "
        "(the Dataverse copy adds dataset); is this the right file?",
    )
    if not images:
        raise DatasetError(
            f"No ISIC_<7 digits>.jpg images under {root}; unpack HAM10000_images_part_1/2 into the root"
        )
    items: list[SourceItem] = []
    missing: list[str] = []
    seen: set[str] = set()
    for row in rows:
        image_id = row["image_id"].upper()
        if not image_id:
            continue
        if image_id in seen:
            raise DatasetError(f"{meta_path} lists image_id {image_id} twice; each image has one row")
        seen.add(image_id)
        path = images.get(image_id)
        if path is None:
            missing.append(image_id)
            continue
        mask = masks.get(image_id)
        metadata: dict[str, Any] = {
            "lesion_id": row["lesion_id"],
            "age": _parse_age(row["age"]),
            "sex": _unknown_to_none(row["sex"]),
            "localization": _unknown_to_none(row["localization"]),
            "dx_type": clean_value(row["dx_type"]),
        }
        if "dataset" in columns:
            metadata["cohort"] = clean_value(row["dataset"])
        items.append(
            SourceItem(
                id=image_id,
                dataset="ham10000",
                source=relative_source(path, root),
                image_path=str(path),
                mask_paths=(str(mask),) if mask else (),
                mask_policy="files" if mask else "none",
                label=row["dx"],
                group=row["lesion_id"] or None,
                metadata=metadata,
            )
        )
    report_missing(
        f"HAM10000 metadata rows (of {len(rows)})",
        missing,
        options,
        f"Unpack both HAM10000_images_part_1 and _part_2 under {root}.",
    )
    unlisted = len(set(images) - seen)
    if unlisted:
        warnings.warn(f"{unlisted} ISIC images under {root} have no metadata row; ignored", DatasetWarning, 2)
    with_mask = sum(1 for it in items if it.mask_paths)
    if masks and with_mask < len(items):
        warnings.warn(
            f"{len(items) - with_mask} of {len(items)} HAM10000 images have no lesion mask "
            "(HAM10000_segmentations_lesion_tschandl); their records get no mask",
            DatasetWarning,
            2,
        )
    return items
