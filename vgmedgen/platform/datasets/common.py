"""What every dataset reader returns, the options they take, and the shared file helpers.

A reader turns a local directory laid out as a public release (docs/datasets.md) into
:class:`SourceItem` rows: one per image, with paths, label, group and metadata, without
opening any image (that is :func:`vgmedgen.platform.datasets.process.process_item`'s job,
run in parallel by the prepare job). Readers are looked up by name in :data:`READERS`.

Errors: a wrong layout, a missing directory or metadata column raises :class:`DatasetError`
(the message names the path and the fix); one unreadable image or mask raises
:class:`CorruptInputError` (naming the file) when it is processed.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from vgmedgen.model.configbase import ConfigError
from vgmedgen.platform.datasets.config import ReaderOptions

__all__ = [
    "IMAGE_SUFFIXES",
    "READERS",
    "CorruptInputError",
    "DatasetError",
    "DatasetWarning",
    "ReaderOptions",
    "SourceItem",
    "apply_captions",
    "read_delimited",
    "read_source_items",
]

#: File suffixes read as images wherever a reader lists a folder (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

MaskPolicy = Literal["files", "empty", "none"]


class DatasetError(ValueError):
    """A dataset directory or table is not laid out as expected; the message says how to fix it."""


class CorruptInputError(ValueError):
    """One image or mask file cannot be decoded; the message names the file."""


class DatasetWarning(UserWarning):
    """Something in a dataset was skipped or left unmatched; the message gives the count."""


@dataclass(frozen=True)
class SourceItem:
    """One image of a source dataset, as found on disk (nothing decoded yet).

    Attributes:
        id: stable and unique within the dataset (``ISIC_0024306``, a Kvasir id, ``benign_12``).
        dataset: reader name: ``ham10000``, ``kvasir_seg``, ``busi`` or ``csv``.
        source: path of the original image, relative to the dataset root (POSIX separators).
        image_path: absolute path of the image.
        mask_paths: absolute mask paths, merged with OR; ``()`` when there is no mask file.
        mask_policy: ``"files"`` (merge ``mask_paths``), ``"empty"`` (no file, but known to
            hold no lesion, e.g. BUSI normal), ``"none"`` (no mask: the record's mask is null).
        label: the class.
        group: what must stay in one split; None means the id itself (or, for BUSI, a
            near-duplicate group found later from perceptual hashes).
        caption: a user-supplied caption (captions CSV or a CSV dataset's column), else None.
        metadata: JSON-able source metadata (age, sex, localization, cohort, dx_type, ...).
            Prompts read only ``localization``/``site`` and ``cohort``/``device``.
        official_split: ``train``/``val``/``test`` where the release ships split lists.
    """

    id: str
    dataset: str
    source: str
    image_path: str
    mask_paths: tuple[str, ...]
    mask_policy: MaskPolicy
    label: str
    group: str | None
    caption: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    official_split: str | None = None

    def to_row(self) -> dict[str, Any]:
        """A flat dict of Arrow-friendly scalars (for ``ray.data.from_items``); see :meth:`from_row`.

        ``metadata`` becomes a JSON string because its value types differ between rows
        (an age is an int in one row and null in the next), which Arrow cannot infer.
        """
        return {
            "id": self.id,
            "dataset": self.dataset,
            "source": self.source,
            "image_path": self.image_path,
            "mask_paths": list(self.mask_paths),
            "mask_policy": self.mask_policy,
            "label": self.label,
            "group": self.group,
            "caption": self.caption,
            "metadata": json.dumps(dict(self.metadata), sort_keys=True),
            "official_split": self.official_split,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SourceItem:
        """Inverse of :meth:`to_row` (accepts any sequence type for ``mask_paths``)."""
        metadata = row.get("metadata") or {}
        mask_paths = row.get("mask_paths")
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        return cls(
            id=str(row["id"]),
            dataset=str(row["dataset"]),
            source=str(row["source"]),
            image_path=str(row["image_path"]),
            # Not `or ()`: Ray Data hands list columns over as numpy arrays, whose truth is ambiguous.
            mask_paths=tuple(str(p) for p in (() if mask_paths is None else mask_paths)),
            mask_policy=row["mask_policy"],
            label=str(row["label"]),
            group=row.get("group"),
            caption=row.get("caption"),
            metadata=dict(metadata),
            official_split=row.get("official_split"),
        )


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def resolve_user_path(path: Path, root: Path) -> Path:
    """An option path: absolute as is; relative from ``root`` when it exists there, else as given."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    return root / path if (root / path).exists() else path.resolve()


def read_delimited(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a comma- or tab-separated table (delimiter sniffed from the header line).

    Header names are stripped and lower-cased; values are stripped. A UTF-8 byte-order
    mark is tolerated (spreadsheet exports write one).

    Returns:
        (column names, rows as dicts).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read table {path}: {exc}") from None
    first = text.split("\n", 1)[0]
    # The header decides: the Dataverse copy of HAM10000's metadata is tab-separated.
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    # newline="" keeps line breaks inside quoted cells (VLM captions may hold them).
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"Table {path} is empty; expected a header row") from None
    columns = [h.strip().strip('"').lower() for h in header]
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue  # blank line
        rows.append({c: (values[i].strip() if i < len(values) else "") for i, c in enumerate(columns)})
    return columns, rows


def require_columns(path: Path, columns: Sequence[str], required: Iterable[str], hint: str) -> None:
    """Raise :class:`DatasetError` naming the missing columns and listing those found."""
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetError(
            f"{path} lacks required column(s) {', '.join(missing)}; found: {', '.join(columns) or '(none)'}. {hint}"
        )


def report_missing(
    what: str, missing: Sequence[str], options: ReaderOptions, fix: str, *, shown: int = 5
) -> None:
    """Error (default) or warn (``skip_missing_files``) about listed files that do not exist."""
    if not missing:
        return
    listing = ", ".join(missing[:shown]) + (f", ... ({len(missing)} in all)" if len(missing) > shown else "")
    if options.skip_missing_files:
        warnings.warn(f"Skipping {len(missing)} {what} whose files are missing: {listing}", DatasetWarning, 3)
        return
    raise DatasetError(
        f"{len(missing)} {what} point at files that do not exist: {listing}. {fix} "
        "Or set skip_missing_files=true to skip them."
    )


def relative_source(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with POSIX separators (absolute if outside the root)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def clean_value(value: str | None) -> str | None:
    """A metadata cell: None for blanks and the usual spellings of 'not available'."""
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in {"", "na", "nan", "n/a", "null", "none"} else value


def sanitize_id(text: str) -> str:
    """Letters, digits and single underscores only: ``benign (12)`` -> ``benign_12``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


# ---------------------------------------------------------------------------------------------
# Captions CSV
# ---------------------------------------------------------------------------------------------


def apply_captions(items: list[SourceItem], captions_csv: Path) -> list[SourceItem]:
    """Join a ``file_name,text`` CSV onto items by image file name.

    A ``file_name`` with a folder part is matched against the item's relative ``source``
    first, then by base name; a base name shared by several items matches none of them
    (it is reported as ambiguous). Unmatched caption rows and items left without a caption
    are reported with a :class:`DatasetWarning`; those items keep generated captions.
    """
    columns, rows = read_delimited(captions_csv)
    text_col = "text" if "text" in columns else ("caption" if "caption" in columns else "text")
    require_columns(
        captions_csv,
        columns,
        ["file_name", text_col],
        "A captions CSV has a header 'file_name,text' (one row per image file name).",
    )
    by_source = {it.source: i for i, it in enumerate(items)}
    by_name: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_name.setdefault(Path(it.source).name, []).append(i)
    captions: dict[int, str] = {}
    unmatched: list[str] = []
    ambiguous: list[str] = []
    for row in rows:
        name, text = row.get("file_name", ""), row.get(text_col, "")
        if not name or not text:
            continue
        posix = name.replace("\\", "/").removeprefix("./")
        if posix in by_source:
            captions[by_source[posix]] = text
            continue
        hits = by_name.get(Path(posix).name, [])
        if len(hits) == 1:
            captions[hits[0]] = text
        elif hits:
            ambiguous.append(name)
        else:
            unmatched.append(name)
    if unmatched or ambiguous:
        parts = []
        if unmatched:
            parts.append(f"{len(unmatched)} match no image (e.g. {', '.join(unmatched[:3])})")
        if ambiguous:
            parts.append(
                f"{len(ambiguous)} name a file name shared by several images (e.g. {', '.join(ambiguous[:3])}); "
                "write the path relative to the dataset root instead"
            )
        warnings.warn(
            f"Captions CSV {captions_csv}: of {len(rows)} rows, " + "; ".join(parts), DatasetWarning, 2
        )
    uncaptioned = len(items) - len(captions)
    if captions and uncaptioned:
        warnings.warn(
            f"Captions CSV {captions_csv} covers {len(captions)} of {len(items)} images; "
            f"the other {uncaptioned} get captions generated from their measurements",
            DatasetWarning,
            2,
        )
    return [replace(it, caption=captions[i]) if i in captions else it for i, it in enumerate(items)]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

Reader = Callable[[Path, ReaderOptions], list[SourceItem]]

# The reader modules import the names above from this module, so they are imported here,
# after those names exist (importing any of them first lands here too, through the package).
from vgmedgen.platform.datasets.busi import read_busi  # noqa: E402
from vgmedgen.platform.datasets.csv_dataset import read_csv_dataset  # noqa: E402
from vgmedgen.platform.datasets.ham10000 import read_ham10000  # noqa: E402
from vgmedgen.platform.datasets.kvasir import read_kvasir_seg  # noqa: E402

#: Reader functions by dataset name.
READERS: dict[str, Reader] = {
    "ham10000": read_ham10000,
    "kvasir_seg": read_kvasir_seg,
    "busi": read_busi,
    "csv": read_csv_dataset,
}


def read_source_items(dataset: str, root: Path, options: ReaderOptions | None = None) -> list[SourceItem]:
    """List the images of a local dataset directory, sorted by id.

    Args:
        dataset: a key of :data:`READERS`.
        root: the dataset directory (for ``csv`` also the CSV file itself).
        options: reader options; defaults when None.

    Returns:
        Items sorted by id (deterministic for the same tree), captions joined when
        ``options.captions_csv`` is set.

    Raises:
        ConfigError: unknown dataset name (the message lists the valid ones).
        DatasetError: missing root, wrong layout, no images, duplicate ids.
    """
    options = options or ReaderOptions()
    if dataset not in READERS:
        hint = difflib.get_close_matches(dataset, list(READERS), n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"Unknown dataset '{dataset}'.{did_you_mean} Valid datasets: {', '.join(sorted(READERS))}"
        )
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DatasetError(
            f"Dataset root {root} does not exist. Point data.root at the directory holding the "
            f"{dataset} release (laid out as in docs/datasets.md)."
        )
    items = READERS[dataset](root, options)
    if not items:
        raise DatasetError(f"No {dataset} images found under {root}; check the path and the layout")
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise DatasetError(
                f"Two images get the id {it.id!r}: {seen[it.id]} and {it.source}; ids must be unique per dataset"
            )
        seen[it.id] = it.source
    if options.captions_csv is not None:
        path = resolve_user_path(options.captions_csv, root if root.is_dir() else root.parent)
        if not path.is_file():
            raise DatasetError(f"captions_csv {path} does not exist; give the path of a file_name,text CSV")
        items = apply_captions(items, path)
    return sorted(items, key=lambda it: it.id)
