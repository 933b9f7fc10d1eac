"""The canonical record: one Parquet row per image, defined once (docs/datasets.md).

Every source (SynthDerm, HAM10000, Kvasir-SEG, BUSI, a user's CSV) becomes rows of
:data:`RECORD_SCHEMA`; everything downstream reads only these. Images and masks are PNG
bytes in binary columns (Ray's tensor extension type reads back badly in plain pyarrow).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from vgmedgen.platform.images import png_bytes

__all__ = [
    "RECORD_SCHEMA",
    "SPLITS",
    "RecordError",
    "decode_images",
    "decode_masks",
    "decode_png",
    "encode_png",
    "records_to_table",
    "validate_table",
    "read_records",
    "read_records_manifest",
    "read_split",
    "write_records_manifest",
]

SPLITS = ("train", "val", "test")

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("anatomy_text", pa.string(), nullable=False),
        pa.field("style_text", pa.string(), nullable=False),
        pa.field("attributes", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ],
    metadata={"vgmedgen.record_version": "1"},
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The JSON beside the part files (what ``prepare`` built them from, and its counts). Its name starts
# with "_" because pyarrow's dataset discovery (and so ``pandas.read_parquet(dir)`` and
# ``pyarrow.parquet.read_table(dir)``) skips names starting with "_" or "."; any other name there is
# read as a Parquet file and fails. Records written before 2026-12 carry it as ``manifest.json``.
RECORDS_MANIFEST = "_manifest.json"
LEGACY_RECORDS_MANIFEST = "manifest.json"


# The ``source`` prefix of synthetic rows (generated images added to a train split); such rows never
# enter val or test.
SYNTHETIC_SOURCE = "synthetic://"


class RecordError(ValueError):
    """Records that do not match the canonical schema; the message names the column and row."""


def encode_png(array: np.ndarray, provenance: Mapping[str, Any] | None = None) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image or an (H, W) uint8 mask.

    ``provenance`` is for generated images only: it is embedded and marks the PNG synthetic
    (:func:`vgmedgen.platform.images.png_bytes`); real records are encoded without it.
    """
    if array.dtype != np.uint8:
        raise RecordError(f"PNG encoding needs uint8 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 3:
        mode = "RGB"
    elif array.ndim == 2:
        mode = "L"
    else:
        raise RecordError(f"PNG encoding needs (H, W, 3) or (H, W), got shape {array.shape}")
    # compress_level 1: records are written once and read many times; level 1 is ~5x faster
    # to write than the default and only slightly larger.
    return png_bytes(Image.fromarray(array, mode=mode), provenance, compress_level=1)


def decode_png(data: bytes, mode: str = "RGB") -> np.ndarray:
    """Decode PNG bytes into a uint8 array: (H, W, 3) for mode "RGB", (H, W) for mode "L"."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert(mode))


def records_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a validated table from record dicts (``attributes`` may be a dict; it is JSON-encoded)."""
    cols: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}
    for row in rows:
        missing = [n for n in RECORD_SCHEMA.names if n not in row]
        if missing:
            raise RecordError(f"record {row.get('id', '?')!r} lacks columns {missing}")
        for name in RECORD_SCHEMA.names:
            value = row[name]
            if name == "attributes" and not isinstance(value, str):
                value = json.dumps(value, sort_keys=True)
            cols[name].append(value)
    table = pa.table(cols, schema=RECORD_SCHEMA)
    validate_table(table)
    return table


def validate_table(table: pa.Table, *, where: str = "records") -> None:
    """Check schema and content rules; raise :class:`RecordError` naming the first problem."""
    if table.schema.remove_metadata() != RECORD_SCHEMA.remove_metadata():
        want = {f.name: str(f.type) for f in RECORD_SCHEMA}
        got = {f.name: str(f.type) for f in table.schema}
        diff = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
        raise RecordError(
            f"{where}: schema differs from the canonical record (column: (expected, got)): {diff}"
        )
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise RecordError(f"{where}: id {dup!r} occurs more than once; ids must be unique")
    for i, split in enumerate(table.column("split").to_pylist()):
        if split not in SPLITS:
            raise RecordError(f"{where}: row {ids[i]!r} has split {split!r}; allowed: {', '.join(SPLITS)}")
    for name in ("image", "mask"):
        for i, blob in enumerate(table.column(name).to_pylist()):
            if blob is not None and not blob.startswith(PNG_MAGIC):
                raise RecordError(f"{where}: row {ids[i]!r} column {name!r} is not PNG data")
    # A group must never be cut by the split.
    group_split: dict[str, str] = {}
    for gid, split, rid in zip(table.column("group").to_pylist(), table.column("split").to_pylist(), ids):
        if group_split.setdefault(gid, split) != split:
            raise RecordError(
                f"{where}: group {gid!r} spans splits {group_split[gid]!r} and {split!r} (row {rid!r})"
            )
    for i, attrs in enumerate(table.column("attributes").to_pylist()):
        try:
            json.loads(attrs)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{where}: row {ids[i]!r} attributes are not JSON: {exc}") from None


def read_records(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a records directory (or one Parquet file) written by ``prepare``, validated.

    Args:
        path: the records directory (``<output_root>/records/<name>``) or a Parquet file.
        columns: read only these columns (no validation beyond the schema of those columns).
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(
            f"No records at {path}. Run `python jobs/prepare.py --config <config>` first, "
            "or point the config's data.records at an existing records directory."
        )
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise RecordError(f"{path} holds no .parquet files; it is not a records directory written by prepare")
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    if columns is None:
        table = table.cast(RECORD_SCHEMA)
        validate_table(table, where=str(path))
    return table


def write_records_manifest(directory: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write the records manifest of ``directory`` (replacing a legacy ``manifest.json``, which would stop
    plain pyarrow and pandas from reading the directory)."""
    directory = Path(directory)
    path = directory / RECORDS_MANIFEST
    path.write_text(json.dumps(dict(manifest), indent=2))
    (directory / LEGACY_RECORDS_MANIFEST).unlink(missing_ok=True)
    return path


def read_records_manifest(directory: str | Path, *, migrate: bool = False) -> dict[str, Any] | None:
    """The records manifest of ``directory``, or None when it has none (or an unreadable one).

    Records written before 2026-12 name it ``manifest.json``; it is read too, and with ``migrate`` renamed
    to ``_manifest.json`` so that the directory opens with ``pandas.read_parquet`` and
    ``pyarrow.parquet.read_table``.
    """
    directory = Path(directory)
    for name in (RECORDS_MANIFEST, LEGACY_RECORDS_MANIFEST):
        try:
            manifest = json.loads((directory / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if migrate and name == LEGACY_RECORDS_MANIFEST:
            try:
                (directory / name).replace(directory / RECORDS_MANIFEST)
            except FileNotFoundError:
                pass  # another job renamed it first
        return manifest
    return None


def read_split(
    path: str | Path, split: str, columns: list[str] | None = None, limit: int | None = None
) -> pa.Table:
    """The rows of one split (the first ``limit`` of them), reading only ``columns`` if given."""
    if columns is not None and "split" not in columns:
        columns = [*columns, "split"]
    table = read_records(path, columns)
    table = table.filter(pc.equal(table.column("split"), split))
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise ValueError(f"The records at {path} have no rows in split '{split}'")
    return table


def decode_images(blobs: Sequence[bytes], *, desc: str | None = None) -> np.ndarray:
    """PNG blobs (an ``image`` column) as one (N, H, W, 3) uint8 array (a quarter of float32's memory).

    ``desc`` labels a progress bar (for a whole split on the driver; none by default, as inside workers).
    """
    from tqdm.auto import tqdm

    return np.stack([decode_png(b) for b in tqdm(blobs, desc=desc, unit="image", disable=desc is None)])


def decode_masks(
    blobs: Sequence[bytes | None], size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """PNG blobs or None (a ``mask`` column) as (N, H, W) bool, all False where a row has no mask, and
    the (N,) has-mask flags. ``size`` is (H, W); None takes it from the first mask present."""
    blobs = list(blobs)
    if size is None:
        first = next((b for b in blobs if b is not None), None)
        size = decode_png(first, "L").shape if first is not None else (1, 1)
    masks = np.zeros((len(blobs), *size), bool)
    has = np.zeros(len(blobs), bool)
    for i, blob in enumerate(blobs):
        if blob is not None:
            masks[i], has[i] = decode_png(blob, "L") > 127, True
    return masks, has
