"""A user's own dataset described by one CSV (comma- or tab-separated).

Columns:
- ``image`` (required): image path, relative to the CSV's folder or absolute.
- ``label`` (required): the class.
- ``mask`` (optional): mask path(s) like ``image``; several paths separated by ``;`` are
  merged with OR. A blank cell means no mask is known (record mask null); the word
  ``empty`` means the image is known to hold no lesion (all-zero mask).
- ``caption`` (optional): the image's caption (else one is generated from measurements).
- ``group`` (optional): what must stay in one split (e.g. patient or lesion id).
- ``id`` (optional): stable unique id; default the image file's stem, or the sanitised
  relative path when stems repeat.
- ``split`` (optional): ``train``/``val``/``test``, used as the official split.
- Any other column goes into metadata as text (blank -> None). Prompts read ``site`` or
  ``localization`` (body site, anatomy text) and ``cohort`` or ``device`` (style text).

The CSV is ``ReaderOptions.csv_file`` (relative to the root) or the root itself when the root
is a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vgmedgen.platform.datasets.common import (
    DatasetError,
    ReaderOptions,
    SourceItem,
    clean_value,
    read_delimited,
    relative_source,
    report_missing,
    require_columns,
    resolve_user_path,
    sanitize_id,
)

__all__ = ["KNOWN_COLUMNS", "read_csv_dataset"]

KNOWN_COLUMNS = ("image", "label", "mask", "caption", "group", "id", "split")
_SPLITS = ("train", "val", "test")


def _find_csv(root: Path, options: ReaderOptions) -> Path:
    if options.csv_file is not None:
        path = resolve_user_path(options.csv_file, root if root.is_dir() else root.parent)
        if not path.is_file():
            raise DatasetError(f"csv_file {path} does not exist; give the path of the dataset CSV")
        return path
    if root.is_file():
        return root
    raise DatasetError(
        f"The csv dataset needs its table: set csv_file (e.g. {root / 'dataset.csv'}) or point "
        "data.root at the CSV file itself. Columns: image,label[,mask,caption,group,id,split]."
    )


def read_csv_dataset(root: Path, options: ReaderOptions) -> list[SourceItem]:
    """Items of a user's CSV dataset (see the module docstring for the columns)."""
    csv_path = _find_csv(root, options)
    base = csv_path.parent
    data_root = root if root.is_dir() else base
    columns, rows = read_delimited(csv_path)
    require_columns(
        csv_path,
        columns,
        ["image", "label"],
        "A dataset CSV has at least the columns image,label (optional: mask, caption, group, id, split).",
    )

    def resolve(cell: str) -> Path:
        p = Path(cell).expanduser()
        return p if p.is_absolute() else base / p

    missing: list[str] = []
    parsed: list[dict[str, Any]] = []
    for line_no, row in enumerate(rows, start=2):
        if not row["image"]:
            raise DatasetError(f"{csv_path} line {line_no}: the image cell is empty")
        if not row["label"]:
            raise DatasetError(f"{csv_path} line {line_no}: the label cell is empty ({row['image']})")
        image = resolve(row["image"])
        mask_cell = row.get("mask", "")
        if mask_cell.lower() == "empty":
            mask_paths: tuple[Path, ...] = ()
            policy = "empty"
        elif mask_cell:
            mask_paths = tuple(resolve(p.strip()) for p in mask_cell.split(";") if p.strip())
            policy = "files"
        else:
            mask_paths, policy = (), "none"
        absent = [str(p) for p in (image, *mask_paths) if not p.is_file()]
        if absent:
            missing.extend(absent)
            continue
        split = clean_value(row.get("split"))
        if split is not None and split.lower() not in _SPLITS:
            raise DatasetError(
                f"{csv_path} line {line_no}: split {split!r} is not one of {', '.join(_SPLITS)} (or blank)"
            )
        metadata = {c: clean_value(row[c]) for c in columns if c not in KNOWN_COLUMNS}
        parsed.append(
            {
                "image": image,
                "masks": mask_paths,
                "policy": policy,
                "row": row,
                "split": split.lower() if split else None,
                "metadata": metadata,
            }
        )
    report_missing(
        f"rows of {csv_path.name}", missing, options, "Fix the paths (relative to the CSV's folder)."
    )

    # Default ids: file stems, unless two images share a stem (then their relative paths).
    stems = [p["image"].stem for p in parsed]
    unique_stems = len(set(stems)) == len(stems)
    items = []
    for p in parsed:
        row = p["row"]
        source = relative_source(p["image"], data_root)
        if row.get("id"):
            item_id = row["id"]
        elif unique_stems:
            item_id = p["image"].stem
        else:
            item_id = sanitize_id(str(Path(source).with_suffix("")))
        items.append(
            SourceItem(
                id=item_id,
                dataset="csv",
                source=source,
                image_path=str(p["image"]),
                mask_paths=tuple(str(m) for m in p["masks"]),
                mask_policy=p["policy"],
                label=row["label"],
                group=clean_value(row.get("group")),
                caption=clean_value(row.get("caption")),
                metadata=p["metadata"],
                official_split=p["split"],
            )
        )
    return items
